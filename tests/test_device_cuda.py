"""The package on a CUDA GPU: a tiny pretraining run in fp32 and in bf16 + compile, an exact-enough resume,
FSDP2 on one GPU under torchrun, and fine-tuning. Skipped without CUDA; `bash bench/gpu_check.sh` runs them
on a GPU machine (`-m cuda`).

A GPU's backward (atomic adds in the embedding gradient) is not bitwise deterministic, so runs that differ
only in how they were started are compared within a tolerance, not for equality.
"""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_parallel import torchrun
from test_trainer import ROOT, TINY, records

from mlm_pretrain.checkpoint import latest_checkpoint

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
PLAN = ["--max-steps", "40", "save_every=4", "eval_every=20"]


def pretrain(out: Path, *args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    launcher = launcher or [sys.executable, "-m", "mlm_pretrain"]
    cmd = [*launcher, "pretrain", *TINY, "--out", str(out), *PLAN, *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_learned_on_cuda(run: Path, result: subprocess.CompletedProcess) -> None:
    from transformers import AutoModelForMaskedLM

    assert "on cuda" in result.stderr  # the trainer's start-up line names the device
    losses = [loss for _, loss in records(run, "loss")]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) < sum(losses[:5])
    AutoModelForMaskedLM.from_pretrained(run / "final")


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cuda") / "fp32"
    assert_learned_on_cuda(run, pretrain(run))
    return run


def test_a_tiny_run_learns_on_cuda_in_fp32(fp32_run):
    assert (fp32_run / "final" / "model.safetensors").is_file()


def test_a_tiny_run_learns_on_cuda_in_bf16_compiled(tmp_path):
    run = tmp_path / "bf16"
    assert_learned_on_cuda(run, pretrain(run, "impl.mixed_precision=bf16", "impl.compile=true"))


def test_a_killed_cuda_run_resumes_where_it_stopped(fp32_run, tmp_path):
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mlm_pretrain", "pretrain", *TINY, "--out", str(killed), *PLAN]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-000008").exists() and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed_from = latest_checkpoint(killed)
    assert resumed_from is not None and int(resumed_from.name[5:]) < 40, "the run ended before it was killed"

    result = pretrain(killed, "--resume")
    assert f"resumed from {resumed_from}" in result.stderr
    straight, resumed = records(fp32_run, "loss"), records(killed, "loss")
    assert [s for s, _ in straight] == [s for s, _ in resumed]
    assert [x for _, x in resumed] == pytest.approx([x for _, x in straight], rel=1e-3)


def test_fsdp2_on_one_gpu_under_torchrun_trains_as_one_process_does(fp32_run, tmp_path):
    run = tmp_path / "fsdp"
    assert_learned_on_cuda(run, pretrain(run, "parallel=fsdp", launcher=torchrun(1)))
    sharded, plain = records(run, "loss"), records(fp32_run, "loss")
    assert [x for _, x in sharded] == pytest.approx([x for _, x in plain], rel=1e-3)


def test_finetuning_on_cuda_scores_a_task(fp32_run, tmp_path):
    task = ROOT / "tests" / "data" / "tasks" / "rt_sentiment"
    cmd = [sys.executable, "-m", "mlm_pretrain", "finetune", "--model", str(fp32_run / "final")]
    cmd += ["--task", str(task), "--out", str(tmp_path), "--seeds", "1", "--epochs", "2"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((tmp_path / "results.json").read_text())["seeds"][0]["scores"]["test"]
    assert 0.0 <= scores["accuracy"] <= 1.0
