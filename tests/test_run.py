"""The one run every objective trains in: word2vec gets the stop rules, the signals and exact resume
that the MLM loop has (tests/test_faults.py and test_trainer.py hold the MLM side)."""

import json
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file
from test_word2vec import W2V

from mlm_pretrain.checkpoint import complete_checkpoints, read_trainer_state
from mlm_pretrain.stop import PREEMPTED_EXIT

SMALL = ["word2vec.vector_size=16", "impl.log_every=1"]


def word2vec(out, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*W2V, *SMALL, "--out", str(out), *args], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = word2vec(out)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.mark.slow
def test_word2vec_stops_at_max_steps_with_a_checkpoint_and_an_export(straight, tmp_path):
    result = word2vec(tmp_path, "max_steps=3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [step for step, _ in complete_checkpoints(tmp_path)][-1] == 3
    assert (tmp_path / "final" / "vectors.bin").exists()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 3 < read_trainer_state(complete_checkpoints(straight)[-1][1])["step"]


@pytest.mark.slow
def test_word2vec_stops_on_max_minutes_and_max_tokens(tmp_path):
    started = time.monotonic()
    result = word2vec(tmp_path / "minutes", "max_minutes=0.05", "word2vec.epochs=200")
    assert result.returncode == 0, result.stderr[-2000:]
    assert time.monotonic() - started < 120  # 200 epochs would take half an hour
    state = read_trainer_state(complete_checkpoints(tmp_path / "minutes")[-1][1])
    assert 3 <= state["elapsed"] < 60
    result = word2vec(tmp_path / "tokens", "max_tokens=250000")
    assert result.returncode == 0, result.stderr[-2000:]
    state = read_trainer_state(complete_checkpoints(tmp_path / "tokens")[-1][1])
    assert 250_000 <= state["tokens"] < 400_000  # a round is 100k words


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_saves_exits_75_and_resume_ends_with_the_straight_runs_vectors(straight, tmp_path, sig):
    command = [*W2V, *SMALL, "--out", str(tmp_path), "save_every=100"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "metrics.jsonl").exists() and process.poll() is None:  # a round or more done
        time.sleep(0.05)
    process.send_signal(sig)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == PREEMPTED_EXIT, stderr[-2000:]
    assert "preempted at step" in stderr and "Traceback" not in stderr
    (stopped, _), *_ = complete_checkpoints(tmp_path)
    assert stopped < read_trainer_state(complete_checkpoints(straight)[-1][1])["step"]
    assert not (tmp_path / "final").exists()

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"(step {stopped})" in resumed.stderr
    a, b = (load_file(run / "final" / "model.safetensors")["embeddings"] for run in (straight, tmp_path))
    assert torch.equal(a, b)
