"""Every standard launcher forms one process group, and one job at a time holds a run directory.

Each launcher runs the same tiny plan in 2 processes over gloo on this CPU; the result must be the
1-process run's loss curve and evaluation, logged once, exported once.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_faults import run_cli
from test_trainer import ROOT, TINY, pretrain, records
from transformers import AutoModelForMaskedLM

from mlm_pretrain.checkpoint import latest_checkpoint
from mlm_pretrain.run_dir import _lock, hold_run_dir
from mlm_pretrain.stop import PREEMPTED_EXIT

PLAN = ["--max-steps", "6", "save_every=3", "eval_every=100"]
TWO = ["optim.micro_batch_size=4"]  # the same global batch (8) and evaluation batch over 2 processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> tuple[str, ...]:
    return (sys.executable, "-m", "torch.distributed.run", *args, "-m", "mlm_pretrain")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    pretrain(out, *PLAN)
    return out


def two_nodes_on_this_host(out: Path) -> str:
    """`torchrun --nnodes 2` twice on this host, as two machines would run it; their output."""
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [
                *torchrun(
                    *("--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1"),
                    *("--master_addr", "127.0.0.1", "--master_port", port),
                ),
                *("pretrain", *TINY, "--out", str(out), *PLAN, *TWO),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    return "".join(out + err for out, err in outputs)


def accelerate_config(tmp_path: Path) -> Path:
    """What `accelerate config` saves for 2 CPU processes on one machine."""
    config = tmp_path / "accelerate.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_machines: 1\n"
        "num_processes: 2\nmachine_rank: 0\nmixed_precision: 'no'\nuse_cpu: true\n"
    )
    return config


LAUNCHERS = ["torchrun", "torchrun-2-nodes", "accelerate-cpu", "accelerate-config-file"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_every_launcher_forms_one_group_with_the_loss_curve_of_one_process(launcher, one_process, tmp_path):
    out = tmp_path / "run"
    if launcher == "torchrun-2-nodes":
        output = two_nodes_on_this_host(out)
    else:
        command = {
            "torchrun": torchrun("--nproc_per_node", "2", "--master_port", str(free_port())),
            "accelerate-cpu": ("accelerate", "launch", "--num_processes", "2", "--cpu", "-m", "mlm_pretrain"),
            "accelerate-config-file": (
                *("accelerate", "launch", "--config_file", str(accelerate_config(tmp_path))),
                *("--main_process_port", str(free_port()), "-m", "mlm_pretrain"),
            ),
        }[launcher]
        result = pretrain(out, *PLAN, *TWO, launcher=command)
        output = result.stdout + result.stderr
    assert output.count("2 processes x 4 blocks") == 1  # one group of two, and only the main process logs
    assert output.count("model saved to") == 1

    one, two = records(one_process, "loss"), records(out, "loss")
    assert [s for s, _ in two] == list(range(1, 7))  # each step logged once
    for (_, a), (_, b) in zip(one, two, strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    assert records(out, "eval_loss")[0][1] == pytest.approx(records(one_process, "eval_loss")[0][1], rel=1e-4)
    checkpoint = latest_checkpoint(out)
    assert sorted(p.name for p in checkpoint.glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]
    assert not list(out.glob("final?*"))  # one export, no leftovers of a second
    _, info = AutoModelForMaskedLM.from_pretrained(out / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]


def test_a_run_directory_is_held_by_one_holder_at_a_time(tmp_path):
    class Alone:  # what `hold_run_dir` reads of the Accelerator of a 1-process job
        is_main_process, num_processes = True, 1

    hold_run_dir(tmp_path, Alone())
    hold_run_dir(tmp_path, Alone())  # the holder may take it again: a second run in the same process
    # another open file of the lock, which is what a second job has, finds it held and by whom
    assert f"pid {os.getpid()}" in _lock(tmp_path.resolve())


@pytest.mark.slow
def test_a_second_job_is_refused_while_the_first_lives_and_a_killed_job_never_blocks_resume(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mlm_pretrain", "pretrain", *TINY, "--out", str(out)]
    plan = ["--max-steps", "5000", "save_every=5", "eval_every=100000"]
    first = subprocess.Popen([*cmd, *plan], cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while latest_checkpoint(out) is None and time.time() < deadline:
            time.sleep(0.1)
        assert json.loads((out / ".lock").read_text())["pid"] == first.pid

        second = pretrain(out, *plan, "--resume", check=False)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"is in use by pid {first.pid}" in second.stderr
        word2vec = run_cli(
            "pretrain", "--recipe", str(ROOT / "recipes/word2vec-skipgram.yaml"), "--out", str(out)
        )
        assert word2vec.returncode == 2 and f"is in use by pid {first.pid}" in word2vec.stderr, (
            word2vec.stderr
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    killed_at = latest_checkpoint(out)
    log = tmp_path / "resumed.log"
    with log.open("w") as stderr:
        resumed = subprocess.Popen([*cmd, *plan, "--resume"], cwd=ROOT, stderr=stderr)
        while latest_checkpoint(out) == killed_at and resumed.poll() is None:
            time.sleep(0.1)
        resumed.send_signal(signal.SIGTERM)  # it trains on: stop it at a step, with a checkpoint
        assert resumed.wait(timeout=120) == PREEMPTED_EXIT
    assert f"resumed from {killed_at}" in log.read_text()
