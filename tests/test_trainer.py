"""The pretraining command end to end, in subprocesses as a user runs it (tiny model, tiny blocks)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlm_pretrain.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--recipe",
    str(ROOT / "recipes/tiny.yaml"),
    "data.seq_len=32",
    "optim.batch_size=8",
    "optim.micro_batch_size=8",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "eval_blocks=32",
    "impl.progress=false",
    "log_every=1",
]


def pretrain(out, *args, launcher=(sys.executable, "-m", "mlm_pretrain"), check=True, **kw):
    cmd = [*launcher, "pretrain", *TINY, "--out", str(out), *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def records(run_dir, key):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r[key]) for r in map(json.loads, lines) if key in r]


@pytest.mark.slow
def test_a_run_learns_logs_and_exports_a_model_hf_loads(tmp_path):
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

    pretrain(tmp_path, "--max-steps", "30", "eval_every=15", "save_every=10", "keep_last=2")
    losses = [loss for _, loss in records(tmp_path, "loss")]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < losses[0] - 0.5
    evals = records(tmp_path, "eval_loss")
    assert [s for s, _ in evals] == [15, 30] and evals[1][1] < evals[0][1]
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000020", "step-000030"]

    final = tmp_path / "final"
    assert (final / "model.safetensors").exists() and not list(final.glob("*.bin"))
    card = (final / "README.md").read_text()
    assert "perplexity" in card and "max_steps: 30" in card and "@sample" in card
    # what is published names no local path: the run directory is ".", a tokenizer by its last part
    for published in (card, (final / "recipe.yaml").read_text()):
        assert str(tmp_path) not in published and str(ROOT) not in published
        assert "tokenizer: tokenizers/default-wordpiece-8k" in published and "out: ." in published
    tokenizer = AutoTokenizer.from_pretrained(final)
    model, info = AutoModelForMaskedLM.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and len(tokenizer) == model.config.vocab_size == 8192
    classifier, info = AutoModelForSequenceClassification.from_pretrained(final, output_loading_info=True)
    # the pooler and the classifier: the two parts masked-LM pretraining never trains
    new = {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
    assert info["missing_keys"] == new
    with torch.no_grad():
        logits = model(**tokenizer("it is a truth universally [MASK]", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_a_killed_run_resumes_to_bit_identical_weights(tmp_path):
    plan = ["--max-steps", "24", "save_every=4", "eval_every=12", "keep_last=3"]
    pretrain(tmp_path / "straight", *plan)

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mlm_pretrain", "pretrain", *TINY, "--out", str(killed), *plan]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-000008").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed_from = latest_checkpoint(killed)
    assert resumed_from is not None and int(resumed_from.name[5:]) < 24

    result = pretrain(killed, *plan, "--resume")
    assert f"resumed from {resumed_from}" in result.stderr
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(killed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert records(tmp_path / "straight", "loss") == records(killed, "loss")


@pytest.mark.slow
def test_a_run_directory_is_never_silently_reused(tmp_path):
    pretrain(tmp_path, "--max-steps", "2", "save_every=1", "eval_every=100", "eval_blocks=8")
    again = pretrain(tmp_path, "--max-steps", "2", check=False)
    assert again.returncode == 2 and "already holds checkpoints: continue with --resume" in again.stderr
    changed = pretrain(tmp_path, "--max-steps", "2", "--resume", "optim.lr=0.1", check=False)
    assert changed.returncode == 2 and "differs from this recipe in optim.lr" in changed.stderr
    (tmp_path / "checkpoints" / "step-000003.partial").mkdir()  # what a crash mid-save leaves
    assert latest_checkpoint(tmp_path).name == "step-000002"


@pytest.mark.slow
def test_pretraining_pushes_every_n_checkpoints_without_leaking_the_token(tmp_path):
    from hub_server import FakeHub

    token = "hf_PretrainPushToken1234567890"
    env = {**os.environ, "HF_TOKEN": token, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE")  # the one test that talks to a Hub: the fake one on 127.0.0.1
    with FakeHub(token) as hub:
        env["HF_ENDPOINT"] = hub.url
        result = pretrain(
            tmp_path / "run",
            "--max-steps",
            "6",
            "save_every=2",
            "eval_every=100",
            "impl.push_to_hub=someone/tiny-mlm",
            "impl.push_every=2",
            env=env,
        )
    commits = [c["summary"] for c in hub.repos["someone/tiny-mlm"].commits]
    assert commits == ["Checkpoint at step 4", "Checkpoint at step 6"]
    pushed = hub.repos["someone/tiny-mlm"].branches["main"]
    assert pushed["model.safetensors"] == (tmp_path / "run" / "final" / "model.safetensors").read_bytes()
    assert not any(name.endswith(".pt") for name in pushed)
    assert token not in result.stdout + result.stderr
    assert not [p for p in (tmp_path / "run").rglob("*") if p.is_file() and token.encode() in p.read_bytes()]

    no_token = {k: v for k, v in env.items() if k != "HF_TOKEN"}
    refused = pretrain(
        tmp_path / "other", "--max-steps", "2", "impl.push_to_hub=someone/x", env=no_token, check=False
    )
    assert refused.returncode == 2 and "needs a Hub token" in refused.stderr


@pytest.mark.slow
def test_the_bf16_compiled_path_trains_close_to_fp32(tmp_path):
    """The benchmarks' and the cram recipe's path: bf16 autocast with the encoder layers and the MLM
    head compiled. Same init, same batches: the first losses agree to bf16's precision, and all are finite."""
    plan = ["--max-steps", "4", "eval_every=100", "save_every=100"]
    pretrain(tmp_path / "fp32", *plan)
    pretrain(tmp_path / "bf16", *plan, "impl.mixed_precision=bf16", "impl.compile=true")
    fp32, bf16 = records(tmp_path / "fp32", "loss"), records(tmp_path / "bf16", "loss")
    assert len(bf16) == 4 and all(loss == loss and abs(loss) < 100 for _, loss in bf16)
    for (_, a), (_, b) in zip(fp32, bf16, strict=True):
        assert b == pytest.approx(a, rel=2e-2)


@pytest.mark.slow
def test_a_minutes_budget_holds_for_the_whole_run_evaluations_included(tmp_path):
    """max_minutes is the user's clock: here evaluation (every step, 256 blocks) takes most of the time,
    and a budget counting only training steps would run for minutes."""
    started = time.time()
    pretrain(
        tmp_path, "max_steps=null", "max_minutes=0.1", "eval_every=1", "eval_blocks=256", "save_every=1000"
    )
    assert time.time() - started < 45  # 6 s of budget, the interpreter's start, the final export
    state = json.loads((latest_checkpoint(tmp_path) / "trainer_state.json").read_text())
    assert 6 <= state["elapsed"] < 6 + 10  # stopped at the first step past the budget


@pytest.mark.slow
def test_the_continued_pretraining_recipe_carries_on_from_the_checkpoint(tiny_checkpoint, tmp_path):
    """recipes/continue-on-task.yaml as the README runs it: MLM continued from a checkpoint on a task's
    training sentences. The export is the checkpoint's architecture, moved a little from its weights, not
    a fresh model."""
    task = ROOT / "tests" / "data" / "tasks" / "rt_sentiment"
    cmd = [
        sys.executable, "-m", "mlm_pretrain", "pretrain",
        "--recipe", str(ROOT / "recipes/continue-on-task.yaml"),
        f"model.init_from={tiny_checkpoint}", f"data.tokenizer={tiny_checkpoint}",
        "--corpus", str(task / "train.jsonl"), "--validation", str(task / "validation.jsonl"),
        "--out", str(tmp_path / "run"), "--max-steps", "4", "data.seq_len=32", "optim.batch_size=8",
        "optim.micro_batch_size=8", "eval_every=4", "save_every=4", "impl.progress=false",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    before = load_file(tiny_checkpoint / "model.safetensors")
    after = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert set(after) <= set(before)
    assert any(not torch.equal(after[name], before[name]) for name in after)
    embeddings = "bert.embeddings.word_embeddings.weight"
    moved = (after[embeddings] - before[embeddings]).norm() / before[embeddings].norm()
    assert 0 < moved < 0.2  # a fresh initialisation would be ~1.4 away
    assert [step for step, _ in records(tmp_path / "run", "eval_loss")] == [4]


def test_an_infinite_gradient_skips_the_update_with_clipping_off_too():
    from accelerate import Accelerator

    from mlm_pretrain.trainer import apply_update

    accelerator = Accelerator(cpu=True)
    for clip in (1.0, 0.0):
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        before = [p.detach().clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = torch.full_like(p, float("inf"))
        assert not apply_update(model, optimizer, torch.tensor(1.0), clip, accelerator)  # the loss is finite
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
