"""Faults and bad input: each fault injected, the message checked, nothing saved earlier lost."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlm_pretrain.errors import InputError
from mlm_pretrain.finetune import load_task
from mlm_pretrain.recipe import load_recipe
from mlm_pretrain.schema import PretrainRecipe

ROOT = Path(__file__).resolve().parent.parent
TINY_RECIPE = ROOT / "recipes" / "tiny.yaml"


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    """`python -m mlm_pretrain ARGV` as a user runs it, offline."""
    return subprocess.run(
        [sys.executable, "-m", "mlm_pretrain", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )


# --- fine-tuning inputs ---


def write_task(directory: Path, **splits: str) -> Path:
    """A task directory holding `splits` (file name -> contents), e.g. train_jsonl='...'."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in splits.items():
        (directory / name.replace("_", ".")).write_text(text, encoding="utf-8")
    return directory


def jsonl(*rows: dict) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


GOOD_TRAIN = jsonl(*({"text": f"row {i}", "label": ["neg", "pos"][i % 2]} for i in range(6)))


def test_a_malformed_line_is_named_by_file_and_line(tmp_path):
    task = write_task(tmp_path / "t", train_jsonl=GOOD_TRAIN + '{"text": "cut off", "lab\n')
    with pytest.raises(InputError, match=rf"{task / 'train.jsonl'}:7: not a JSON line"):
        load_task(str(task))
    task = write_task(tmp_path / "t", train_jsonl=GOOD_TRAIN + '["a", "list"]\n')
    with pytest.raises(InputError, match=rf"{task / 'train.jsonl'}:7: expected a JSON object, got list"):
        load_task(str(task))
    task = write_task(
        tmp_path / "c", train_csv="text,label\nfine,pos\ntoo,many,cells\n", test_csv="text,label\n"
    )
    with pytest.raises(InputError, match=rf"{task / 'train.csv'}:3: 3 cells, the header names 2"):
        load_task(str(task))
    latin = tmp_path / "latin"
    latin.mkdir()
    (latin / "train.csv").write_bytes("text,label\nfine,pos\ncaf\xe9,neg\n".encode("latin-1"))
    with pytest.raises(InputError, match=rf"{latin / 'train.csv'}:3: not UTF-8 text"):
        load_task(str(latin))


def test_an_empty_split_is_refused(tmp_path):
    task = write_task(tmp_path / "t", train_jsonl=GOOD_TRAIN, test_jsonl="\n\n")
    with pytest.raises(InputError, match=rf"{task / 'test.jsonl'}: no rows"):
        load_task(str(task))
    task = write_task(tmp_path / "c", train_csv="text,label\n", test_csv="text,label\nfine,pos\n")
    with pytest.raises(InputError, match=rf"{task / 'train.csv'}: no rows"):
        load_task(str(task))
    one_row = write_task(
        tmp_path / "one",
        train_jsonl=jsonl({"text": "a", "label": 0.5}),
        test_jsonl=jsonl({"text": "b", "label": 1}),
    )
    with pytest.raises(InputError, match=r"train.jsonl: 1 row: too few to hold out a validation split"):
        load_task(str(one_row))


def test_a_missing_text_or_label_field_is_named(tmp_path):
    test = jsonl({"text": "fine", "label": "pos"}, {"label": "neg"})
    task = write_task(tmp_path / "t", train_jsonl=GOOD_TRAIN, test_jsonl=test)
    with pytest.raises(
        InputError, match=rf"{task / 'test.jsonl'}:2: missing field 'text' \(keys: \['label'\]\)"
    ):
        load_task(str(task))
    task = write_task(
        tmp_path / "c", train_csv="text,label\nfine,pos\nshort\nok,neg\n", test_csv="text,label\na,pos\n"
    )
    with pytest.raises(InputError, match=rf"{task / 'train.csv'}:3: missing field 'label'"):
        load_task(str(task))
    blank = write_task(
        tmp_path / "b", train_csv="text,label\nfine,pos\nblank, \n", test_csv="text,label\na,pos\n"
    )
    with pytest.raises(InputError, match=rf"{blank / 'train.csv'}:3: missing field 'label'"):
        load_task(str(blank))


def test_labels_of_mixed_kinds_are_refused(tmp_path):
    test = jsonl({"text": "a", "label": "pos"}, {"text": "b", "label": 1})
    task = write_task(tmp_path / "t", train_jsonl=GOOD_TRAIN, test_jsonl=test)
    with pytest.raises(
        InputError,
        match=rf"field 'label' mixes numbers and class names: {task / 'train.jsonl'}:1 has 'neg', "
        rf"{task / 'test.jsonl'}:2 has 1",
    ):
        load_task(str(task))
    train = jsonl({"text": "a", "label": 0.5}, {"text": "b", "label": [1]})
    task = write_task(tmp_path / "l", train_jsonl=train, test_jsonl=train)
    with pytest.raises(InputError, match=r"train.jsonl:2: label \[1\] is neither a number nor a class name"):
        load_task(str(task))
    task = write_task(tmp_path / "n", train_csv="text,label\na,0.5\nb,nan\n", test_csv="text,label\na,1.5\n")
    with pytest.raises(InputError, match=r"train.csv:3: label 'nan' is not a finite number"):
        load_task(str(task))


def test_a_label_train_never_has_is_refused(tmp_path):
    test = jsonl({"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}, {"text": "c", "label": "POS"})
    task = write_task(tmp_path / "t", train_jsonl=GOOD_TRAIN, test_jsonl=test)
    with pytest.raises(
        InputError,
        match=rf"^{task / 'test.jsonl'}:2: label 'meh' never occurs in {task / 'train.jsonl'}, whose labels "
        r"are neg, pos \(labels train lacks, on 2 of the 3 rows here: POS, meh\)$",
    ):
        load_task(str(task))
    # numeric class ids too, and in a validation file given by name
    train = jsonl(*({"text": f"row {i}", "label": i % 2} for i in range(4)))
    write_task(tmp_path / "f", train_jsonl=train, validation_jsonl=jsonl({"text": "x", "label": 2}))
    with pytest.raises(
        InputError, match=r"validation.jsonl:1: label 2 never occurs in .*, whose labels are 0, 1"
    ):
        load_task(
            "files", train=str(tmp_path / "f/train.jsonl"), validation=str(tmp_path / "f/validation.jsonl")
        )
    one_class = jsonl(*({"text": f"row {i}", "label": "pos"} for i in range(4)))
    task = write_task(tmp_path / "one", train_jsonl=one_class, test_jsonl=one_class)
    with pytest.raises(
        InputError, match=r"train.jsonl: every row has the label 'pos'; a classifier needs two"
    ):
        load_task(str(task))


def test_the_cli_refuses_an_unseen_test_label_before_any_training(tiny_checkpoint, tmp_path):
    task = write_task(
        tmp_path / "task", train_jsonl=GOOD_TRAIN, test_jsonl=jsonl({"text": "a", "label": "maybe"})
    )
    out = tmp_path / "out"
    result = run_cli("finetune", "--model", str(tiny_checkpoint), "--task", str(task), "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{task / 'test.jsonl'}:1: label 'maybe' never occurs in {task / 'train.jsonl'}" in result.stderr
    assert not out.exists()  # nothing trained, nothing written


# --- preemption: a signal mid-run, then the same command again ---

TINY_RUN = [
    *(
        "pretrain",
        "--recipe",
        str(TINY_RECIPE),
        "data.seq_len=32",
        "optim.batch_size=8",
        "micro_batch_size=8",
    ),
    *("model.hidden_size=32", "model.intermediate_size=64", "eval_blocks=16", "impl.progress=false"),
    *("log_every=1", "--max-steps", "400", "save_every=50", "eval_every=1000", "keep_last=2"),
]


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "final" / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def preempt(launcher: list[str], out: Path, signum: int, *extra: str) -> int:
    """Start a run, send `signum` to the launcher once it has trained a few steps, return its exit code."""
    import time

    process = subprocess.Popen([*launcher, *TINY_RUN, *extra, "--out", str(out)], cwd=ROOT)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 20) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signum)
    return process.wait(timeout=300)


@pytest.mark.slow
def test_sigusr1_saves_exits_for_requeue_and_the_same_command_resumes_to_the_straight_weights(tmp_path):
    import signal

    from mlm_pretrain.checkpoint import latest_checkpoint
    from mlm_pretrain.stop import PREEMPTED_EXIT

    one = [sys.executable, "-m", "mlm_pretrain"]
    straight = subprocess.run([*one, *TINY_RUN, "--out", str(tmp_path / "straight")], cwd=ROOT)
    assert straight.returncode == 0

    out = tmp_path / "preempted"
    assert preempt(one, out, signal.SIGUSR1) == PREEMPTED_EXIT
    stopped_at = int(latest_checkpoint(out).name[5:])
    assert 20 <= stopped_at < 400 and stopped_at % 50  # saved at the signal, not on the cadence
    assert not (out / "final").exists()
    again = subprocess.run([*one, *TINY_RUN, "--out", str(out), "--resume"], cwd=ROOT)
    assert again.returncode == 0
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(out))


@pytest.mark.slow
def test_torchrun_forwards_sigterm_and_both_ranks_stop_at_one_step_then_resume_exactly(tmp_path):
    import signal
    import socket

    from mlm_pretrain.checkpoint import latest_checkpoint

    def torchrun() -> list[str]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"] + [
            *("--master_port", str(port), "-m", "mlm_pretrain")
        ]

    two = ["micro_batch_size=4"]
    straight = subprocess.run([*torchrun(), *TINY_RUN, *two, "--out", str(tmp_path / "straight")], cwd=ROOT)
    assert straight.returncode == 0

    out = tmp_path / "preempted"
    assert preempt(torchrun(), out, signal.SIGTERM, *two) != 0  # torchrun reports its workers' stop
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and int(checkpoint.name[5:]) % 50  # both ranks agreed on one step
    assert sorted(p.name for p in checkpoint.glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]
    again = subprocess.run([*torchrun(), *TINY_RUN, *two, "--out", str(out), "--resume"], cwd=ROOT)
    assert again.returncode == 0
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(out))


# --- a diverging loss ---


def strict_records(run_dir: Path) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"{constant} in metrics.jsonl")

    return [
        json.loads(line, parse_constant=refuse)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.slow
@pytest.mark.parametrize("clip", ["1.0", "0"])  # the check does not depend on clipping
def test_a_diverging_run_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path, clip):
    import torch
    from safetensors.torch import load_file

    from mlm_pretrain.checkpoint import complete_checkpoints

    result = run_cli(*TINY_RUN, "--out", str(tmp_path), "save_every=2", "optim.lr=1e6", f"optim.clip={clip}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    checkpoints = complete_checkpoints(tmp_path)
    assert checkpoints, result.stderr
    last_step, last = checkpoints[-1]
    assert f"step {last_step + 1}: the loss or gradient norm is not finite" in result.stderr
    assert f"Last good checkpoint: {last}" in result.stderr
    assert not (tmp_path / "final").exists()
    for _, checkpoint in checkpoints:
        weights = load_file(checkpoint / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values())
    assert any(r.get("skipped_nonfinite") == 1 for r in strict_records(tmp_path))


@pytest.mark.slow
def test_skip_drops_non_finite_updates_and_stops_after_too_many_in_a_row(tmp_path):
    skip = ["optim.on_nonfinite=skip", "optim.max_skips_in_a_row=3", "optim.lr=1e6"]
    result = run_cli(*TINY_RUN, "--out", str(tmp_path), *skip)
    assert result.returncode == 2 and "(4 steps in a row)" in result.stderr
    skipped = [r["skipped_nonfinite"] for r in strict_records(tmp_path) if "skipped_nonfinite" in r]
    assert skipped == [1, 2, 3, 4]
    assert "update skipped (3 in a row)" in result.stderr


def test_mixed_precision_auto_is_bf16_only_where_the_hardware_computes_in_it(monkeypatch):
    import torch

    from mlm_pretrain.launch import resolve_precision

    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("no", "cuda") == "no"
    for avx512_bf16, amx, expected in [(False, False, "no"), (True, False, "bf16"), (False, True, "bf16")]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolve_precision("auto", "cpu") == expected
    with pytest.raises(InputError, match=r"impl.mixed_precision=fp16: got 'fp16'; valid: no, bf16, auto"):
        load_recipe(PretrainRecipe, TINY_RECIPE, ["impl.mixed_precision=fp16"])


def test_a_repeated_preemption_signal_keeps_the_checkpointing_stop_and_a_second_ctrl_c_stops_at_once():
    import signal

    from mlm_pretrain.stop import INTERRUPTED, PREEMPTED, StopRequest

    class Alone:
        num_processes = 1

    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # SLURM and torchrun may both deliver one
        assert stop.requested(Alone()) == PREEMPTED
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested(Alone()) == INTERRUPTED
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


# --- a damaged checkpoint ---


@pytest.mark.slow
def test_a_truncated_checkpoint_is_skipped_and_the_run_resumes_from_the_one_before(tmp_path):
    import shutil

    plan = [*TINY_RUN, "--max-steps", "12", "save_every=4", "keep_last=3"]
    assert run_cli(*plan, "--out", str(tmp_path / "straight")).returncode == 0
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "straight", damaged)
    shutil.rmtree(damaged / "final")
    shutil.rmtree(damaged / "checkpoints" / "step-000012")  # as if stopped after step 8
    weights = damaged / "checkpoints" / "step-000008" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    resumed = run_cli(*plan, "--out", str(damaged), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert str(weights) in resumed.stderr  # the warning names the damaged file
    assert f"resumed from {damaged / 'checkpoints' / 'step-000004'}" in resumed.stderr
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(damaged))
