"""mlm_pretrain.hub against a fake Hub (tests/hub_server.py) on 127.0.0.1: the real huggingface_hub client,
with hf_xet switched off (its upload path needs a xet CAS server the fake does not provide)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import FakeHub

from mlm_pretrain.errors import InputError
from mlm_pretrain.hub import push_checkpoint, push_to_hub

TOKEN = "hf_FakeToken4TestsOnly0123456789abcdef"
UPLOADED = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_report.json",
    "tokenizer_config.json",
    "README.md",
    "eval_results.json",
}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_dir(tiny_checkpoint, tmp_path) -> Path:
    """The tiny checkpoint plus what a training run leaves beside it, none of which may be uploaded."""
    out = shutil.copytree(tiny_checkpoint, tmp_path / "export")
    (out / "eval_results.json").write_text('{"mlm_loss": 5.1}\n')
    for junk in (
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
        "pytorch_model.bin",
        "events.out.tfevents.1700000000.host",
        "train.log",
    ):
        (out / junk).write_bytes(b"not for the hub")
    (out / "checkpoints" / "step-100").mkdir(parents=True)
    (out / "checkpoints" / "step-100" / "model.safetensors").write_bytes(b"old")
    (out / "logs").mkdir()
    return out


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """The token in HF_TOKEN, no login cache, no xet, online (to the fake Hub on 127.0.0.1 only)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-login-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)


def files_holding(needle: str, root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_dry_run_stages_the_allow_list_and_loads_it(model_dir, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)  # a dry run needs no token
    result = push_to_hub(model_dir, "someone/tiny", dry_run=True)
    assert result.dry_run and result.commit_url is None
    assert result.architecture == "BertForMaskedLM"
    assert {name for name, _ in result.files} == UPLOADED
    sizes = dict(result.files)
    assert sizes["model.safetensors"] == (model_dir / "model.safetensors").stat().st_size
    assert result.generated_card
    assert set(result.skipped) == {
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
        "pytorch_model.bin",
        "events.out.tfevents.1700000000.host",
        "train.log",
        "checkpoints/",
        "logs/",
    }
    assert not (model_dir / "README.md").exists()  # the card goes into the staged folder only
    assert "model.safetensors" in result.summary()


@pytest.mark.parametrize(
    ("remove", "named"),
    [
        (["config.json"], "config.json"),
        (["model.safetensors"], "model.safetensors (pytorch_model.bin is never uploaded"),
        (["tokenizer.json", "tokenizer_config.json"], "tokenizer.json or tokenizer_config.json"),
    ],
)
def test_not_a_model_dir_names_what_is_missing(model_dir, remove, named):
    for name in remove:
        (model_dir / name).unlink()
    with pytest.raises(InputError, match="missing") as err:
        push_to_hub(model_dir, "someone/tiny", dry_run=True)
    assert named in str(err.value)


def test_weights_that_do_not_fit_the_config_are_refused(model_dir):
    config = (model_dir / "config.json").read_text()
    (model_dir / "config.json").write_text(config.replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    with pytest.raises(InputError, match="missing_keys"):
        push_to_hub(model_dir, "someone/tiny", dry_run=True)


def test_push_sends_exactly_the_staged_files(model_dir, hub_env, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    with FakeHub(TOKEN) as hub:
        result = push_to_hub(
            model_dir,
            "someone/tiny",
            private=True,
            revision="dev",
            commit_message="first push",
            endpoint=hub.url,
        )

    repo = hub.repos["someone/tiny"]
    assert repo.private
    assert set(repo.branches) == {"main", "dev"} and repo.branches["main"] == {}
    uploaded = repo.branches["dev"]
    assert set(uploaded) == UPLOADED == {name for name, _ in result.files}
    for name in UPLOADED - {"README.md"}:
        assert uploaded[name] == (model_dir / name).read_bytes(), name
    assert list(hub.lfs_objects.values()) == [(model_dir / "model.safetensors").read_bytes()]  # via LFS
    assert b"library_name: transformers" in uploaded["README.md"]
    assert [c["summary"] for c in repo.commits] == ["first push"]
    assert result.commit_url.startswith(f"{hub.url}/someone/tiny/commit/")

    # The token travelled in the Authorization header and nowhere else.
    assert any(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    for r in hub.requests:
        others = {k: v for k, v in r.headers.items() if k != "authorization"}
        assert TOKEN not in r.path and TOKEN not in str(others) and TOKEN.encode() not in r.body, r.path
    assert not any(TOKEN.encode() in data for data in uploaded.values())
    logged = caplog.text + "".join(capsys.readouterr())
    assert f"uploading {len(UPLOADED)} files" in logged and TOKEN not in logged
    assert files_holding(TOKEN, model_dir) == []


def test_a_refused_token_is_an_input_error_without_the_token(model_dir, hub_env):
    with FakeHub("hf_SomeoneElsesToken") as hub, pytest.raises(InputError, match="401") as err:
        push_to_hub(model_dir, "someone/tiny", endpoint=hub.url)
    assert TOKEN not in str(err.value)


def test_no_token_is_an_input_error(model_dir, hub_env, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(InputError, match="HF_TOKEN"):
        push_to_hub(model_dir, "someone/tiny", endpoint="http://127.0.0.1:9")


def test_a_file_holding_the_token_is_never_sent(model_dir, hub_env):
    (model_dir / "eval_results.json").write_text(f'{{"env": "HF_TOKEN={TOKEN}"}}')
    with (
        FakeHub(TOKEN) as hub,
        pytest.raises(InputError, match="eval_results.json contains your Hugging Face token"),
    ):
        push_to_hub(model_dir, "someone/tiny", endpoint=hub.url)
    assert hub.requests == []


def test_private_push_to_an_existing_public_repo_is_refused(model_dir, hub_env):
    with FakeHub(TOKEN) as hub:
        push_to_hub(model_dir, "someone/tiny", endpoint=hub.url)
        with pytest.raises(InputError, match="public"):
            push_to_hub(model_dir, "someone/tiny", private=True, endpoint=hub.url)
    assert len(hub.repos["someone/tiny"].commits) == 1


def test_push_checkpoint_commits_the_step_and_survives_an_unreachable_hub(model_dir, hub_env, caplog):
    with FakeHub(TOKEN) as hub:
        push_checkpoint(model_dir, "someone/tiny", step=500, endpoint=hub.url)
    assert [c["summary"] for c in hub.repos["someone/tiny"].commits] == ["Checkpoint at step 500"]
    # The server is shut down now: its port refuses connections.
    assert push_checkpoint(model_dir, "someone/tiny", step=1000, endpoint=hub.url) is None
    assert "training goes on" in caplog.text and TOKEN not in caplog.text


def test_push_private_reaches_the_hub_and_the_log_says_which(model_dir, hub_env, monkeypatch, capsys, caplog):
    import huggingface_hub.constants

    from mlm_pretrain import cli

    monkeypatch.setattr(cli, "SUBCOMMANDS", ["push"])
    caplog.set_level(logging.INFO, logger="mlm_pretrain.hub")
    with FakeHub(TOKEN) as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        assert cli.main(["push", str(model_dir), "--repo-id", "someone/secret", "--private"]) == 0
        assert "to someone/secret@main (private): " in capsys.readouterr().out
        assert cli.main(["push", str(model_dir), "--repo-id", "someone/open"]) == 0
        assert "to someone/open@main (public): " in capsys.readouterr().out
        push_checkpoint(model_dir, "someone/run", step=5, private=True, endpoint=hub.url)
    created = [json.loads(r.body) for r in hub.requests if r.path.endswith("/repos/create")]
    assert [(c["name"], c.get("visibility", c.get("private"))) for c in created] == [
        ("secret", "private"),
        ("open", "public"),
        ("run", "private"),
    ]
    assert hub.repos["someone/secret"].private and not hub.repos["someone/open"].private
    assert hub.repos["someone/run"].private
    assert "(a private repository)" in caplog.text and "(a public repository)" in caplog.text


def test_the_recipe_chooses_a_private_repository_for_pushes():
    from mlm_pretrain.recipe import load_recipe
    from mlm_pretrain.schema import PretrainRecipe

    recipe = ROOT / "recipes" / "tiny.yaml"
    assert load_recipe(PretrainRecipe, recipe).impl.push_private is False
    assert load_recipe(PretrainRecipe, recipe, ["impl.push_private=true"]).impl.push_private is True


@pytest.mark.slow
def test_push_command_end_to_end(model_dir, tmp_path):
    """`mlm-pretrain push` in a subprocess: the Hub URL from HF_ENDPOINT, the token from HF_TOKEN."""
    env = {
        **os.environ,
        "HF_ENDPOINT": "",
        "HF_TOKEN": TOKEN,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "PYTHONPATH": str(ROOT),
    }
    env.pop("HF_HUB_OFFLINE", None)
    push = [sys.executable, "-m", "mlm_pretrain", "push"]
    command = [*push, str(model_dir), "--repo-id", "someone/tiny"]
    with FakeHub(TOKEN) as hub:
        env["HF_ENDPOINT"] = hub.url
        dry = subprocess.run([*command, "--dry-run"], env=env, capture_output=True, text=True, timeout=300)
        assert dry.returncode == 0, dry.stderr
        assert hub.requests == []
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    for name in UPLOADED:
        assert name in dry.stdout and name in done.stdout
    assert "optimizer.pt" in dry.stdout  # listed as left local
    assert "pushed" in done.stdout and f"{hub.url}/someone/tiny/commit/" in done.stdout
    repo = hub.repos["someone/tiny"]
    assert not repo.private and set(repo.branches["main"]) == UPLOADED
    assert repo.branches["main"]["model.safetensors"] == (model_dir / "model.safetensors").read_bytes()
    for output in (dry.stdout, dry.stderr, done.stdout, done.stderr):
        assert TOKEN not in output
    assert files_holding(TOKEN, model_dir) == []

    missing = subprocess.run(
        [*push, str(tmp_path), "--repo-id", "someone/tiny", "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 2 and "missing config.json" in missing.stderr


def test_finetune_push_sends_the_fine_tuned_model_with_its_scores_as_model_index(
    tiny_checkpoint, hub_env, tmp_path, monkeypatch, capsys
):
    import huggingface_hub.constants
    import torch
    from huggingface_hub import ModelCard

    from mlm_pretrain import cli

    monkeypatch.setattr(cli, "SUBCOMMANDS", ["finetune"])  # the other commands are not under test here
    model = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    out = tmp_path / "out"
    argv = ["finetune", "--model", str(model), "--task", str(ROOT / "tests" / "data" / "tasks" / "trec")]
    argv += ["--seeds", "2", "--epochs", "1", "--max-length", "32", "--no-baseline", "--threads", "1"]
    assert cli.main([*argv, "--push", "someone/tiny-trec"]) == 2
    assert "--push needs --out" in capsys.readouterr().err

    threads = torch.get_num_threads()  # --threads sets torch's for the whole process
    with FakeHub(TOKEN) as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        try:
            assert cli.main([*argv, "--out", str(out), "--push", "someone/tiny-trec", "--private"]) == 0
        finally:
            torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert f"pushed {out / 'model'} to someone/tiny-trec: {hub.url}/someone/tiny-trec/commit/" in printed

    result = json.loads((out / "results.json").read_text())
    run = next(run for run in result["seeds"] if run["seed"] == result["saved_model"]["seed"])
    repo = hub.repos["someone/tiny-trec"]
    uploaded = repo.branches["main"]
    assert repo.private and {"config.json", "model.safetensors", "tokenizer.json", "results.png"} <= set(
        uploaded
    )
    assert uploaded["model.safetensors"] == (out / "model" / "model.safetensors").read_bytes()
    config = json.loads(uploaded["config.json"])
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert len(config["id2label"]) >= 5 and "0" not in config["label2id"]  # trec's class names, not ids

    card = ModelCard(uploaded["README.md"].decode())
    assert card.data.model_name == "tiny-trec" and 'model="someone/tiny-trec"' in card.text
    (scored,) = card.data.eval_results
    assert (scored.task_type, scored.dataset_split, scored.metric_type) == (
        "text-classification",
        "test",
        "accuracy",
    )
    assert scored.metric_value == round(run["scores"]["test"]["accuracy"], 4)
