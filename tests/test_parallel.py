"""FSDP2 against DDP and one process: the same training, sharded checkpoints (DCP) that resume exactly,
on another process count too, an export Hugging Face loads, and the options a large run needs.

Every run is the same tiny plan over gloo on this CPU; the process groups come from torchrun.
"""

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from test_trainer import ROOT, TINY, records

from mlm_pretrain.checkpoint import complete_checkpoints, latest_checkpoint

PLAN = ["--max-steps", "20", "save_every=10", "eval_every=100", "keep_last=1"]


def torchrun(processes: int = 2) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"] + [
        f"--master_port={port}",
        *("-m", "mlm_pretrain"),
    ]


def run(out: Path, *args: str, processes: int = 2, launcher: list[str] | None = None, check: bool = True):
    launcher = launcher or (torchrun(processes) if processes else [sys.executable, "-m", "mlm_pretrain"])
    micro = f"optim.micro_batch_size={8 // max(processes, 1)}"
    cmd = [*launcher, "pretrain", *TINY, micro, "--out", str(out), *PLAN, *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The plan run straight: one process, DDP over 2, FSDP over 2."""
    root = tmp_path_factory.mktemp("parallel")
    run(root / "one", processes=0)
    run(root / "ddp", "parallel=ddp")
    run(root / "fsdp", "parallel=fsdp")
    return {name: root / name for name in ("one", "ddp", "fsdp")}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def assert_losses_match(a: Path, b: Path, rel: float = 1e-4, since: int = 0) -> None:
    la, lb = records(a, "loss"), records(b, "loss")
    assert [s for s, _ in la] == [s for s, _ in lb] == list(range(1, 21))
    for (step, x), (_, y) in zip(la, lb, strict=True):
        if step > since:
            assert x == pytest.approx(y, rel=rel), step


@pytest.mark.slow
def test_fsdp_trains_as_ddp_and_one_process_do(runs):
    assert_losses_match(runs["fsdp"], runs["ddp"])
    assert_losses_match(runs["fsdp"], runs["one"])


@pytest.mark.slow
def test_fsdp_checkpoints_are_dcp_shards_kept_last_k(runs):
    checkpoints = complete_checkpoints(runs["fsdp"])
    assert [step for step, _ in checkpoints] == [20]  # keep_last=1
    files = {p.name for p in checkpoints[0][1].iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "data.json", "manifest.json"} <= files
    assert "model.safetensors" not in files


@pytest.mark.slow
def test_the_fsdp_export_is_the_whole_model_hugging_face_loads(runs):
    from transformers import AutoModelForMaskedLM

    sharded, unsharded = weights(runs["fsdp"]), weights(runs["ddp"])
    assert sharded.keys() == unsharded.keys()
    for key in sharded:
        assert torch.allclose(sharded[key], unsharded[key], atol=1e-5), key
    model, info = AutoModelForMaskedLM.from_pretrained(runs["fsdp"] / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]


@pytest.mark.slow
def test_a_killed_fsdp_run_resumes_to_the_straight_weights(runs, tmp_path):
    out = tmp_path / "killed"
    cmd = [*torchrun(), "pretrain", *TINY, "optim.micro_batch_size=4", "--out", str(out), *PLAN]
    cmd += ["parallel=fsdp", "save_every=5"]
    process = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while latest_checkpoint(out) is None and time.time() < deadline:
        time.sleep(0.05)
    # the launcher and both workers at once, as a lost node (torchrun's workers have their own session)
    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for member in tree:
        member.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=30)
    assert int(latest_checkpoint(out).name[5:]) < 20
    # save_every differs from the straight run's: an impl setting, free to change on resume
    run(out, "parallel=fsdp", "save_every=5", "--resume")
    straight, resumed = weights(runs["fsdp"]), weights(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.slow
def test_a_checkpoint_of_two_processes_resumes_in_one_data_position_included(runs, tmp_path):
    out = tmp_path / "resharded"
    run(out, "parallel=fsdp", "keep_last=2")
    shutil.rmtree(out / "checkpoints" / "step-000020")  # as if stopped at step 10
    shutil.rmtree(out / "final")
    result = run(out, "parallel=fsdp", "--resume", processes=1)
    assert "written by 2 processes and resumes in 1" in result.stderr
    assert_losses_match(out, runs["fsdp"], since=10)
    straight, resumed = weights(runs["fsdp"]), weights(out)
    assert all(torch.allclose(straight[k], resumed[k], atol=1e-5) for k in straight)


@pytest.mark.slow
def test_a_ddp_checkpoint_under_fsdp_is_refused_and_nothing_is_changed(runs, tmp_path):
    out = tmp_path / "ddp"
    shutil.copytree(runs["ddp"], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    result = run(out, "parallel=fsdp", "--resume", check=False)
    assert result.returncode != 0  # the workers exit 2; torchrun reports that as its own failure
    assert (
        "error: " in result.stderr and "impl.parallel=ddp: resume it with impl.parallel=ddp" in result.stderr
    )
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert before == after


@pytest.mark.slow
@pytest.mark.parametrize(
    "option",
    ["impl.activation_checkpointing=true", "optim.micro_batch_size=2"],
    ids=["activation-checkpointing", "gradient-accumulation"],
)
def test_fsdp_options_leave_the_training_unchanged(option, runs, tmp_path):
    run(tmp_path, "parallel=fsdp", option)
    assert_losses_match(tmp_path, runs["fsdp"], rel=1e-5)


@pytest.mark.slow
def test_fsdp_with_layers_compiled_trains_like_eager(runs, tmp_path):
    run(tmp_path, "parallel=fsdp", "impl.compile=true")
    assert_losses_match(tmp_path, runs["fsdp"], rel=1e-3)


def test_micro_batches_but_the_last_leave_fsdp_gradients_unreduced(one_process_group):
    """Under `no_gradient_sync` an FSDP2 module keeps its gradients unsharded and unreduced (no
    sharded .grad appears); the last micro-batch reduces them all at once."""
    from torch.distributed.fsdp import fully_shard

    from mlm_pretrain.parallel import no_gradient_sync

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    with no_gradient_sync(model):
        model(torch.randn(2, 4)).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
