"""Errors every process agrees on: a fault on one rank of two (over gloo) ends both within seconds, with
one message naming the rank and what failed, the same exit code, no traceback, nothing half-saved."""

import os
import re
import subprocess
import sys
import time

import pytest
from test_launch import free_port
from test_trainer import ROOT, TINY

from mlm_pretrain.checkpoint import complete_checkpoints, verify_checkpoint

PLAN = ["--max-steps", "6", "save_every=2", "eval_every=100", "impl.threads=1"]


def two_ranks(fault: str, rank: int, out, *args: str) -> tuple[list[int], list[str], float]:
    """Both ranks' exit codes and stderr, and the seconds between the first rank's end and the last's."""
    port, ended = str(free_port()), {}
    logs = [out.parent / f"{out.name}-rank{r}.log" for r in (0, 1)]
    command = [sys.executable, "tests/fault_rank.py", fault, str(rank), "pretrain", *TINY, "--out", str(out)]
    processes = [
        subprocess.Popen(
            [*command, *PLAN, *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
            env={
                **os.environ,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": "2",
                "LOCAL_WORLD_SIZE": "2",
            },
        )
        for r, log in enumerate(logs)
    ]
    deadline = time.monotonic() + 300
    while len(ended) < 2 and time.monotonic() < deadline:
        for r, process in enumerate(processes):
            if r not in ended and process.poll() is not None:
                ended[r] = time.monotonic()
        time.sleep(0.1)
    for process in processes:
        process.kill()
    assert len(ended) == 2, "a rank was still running 300 s after the start"
    codes = [process.wait() for process in processes]
    return codes, [log.read_text() for log in logs], max(ended.values()) - min(ended.values())


FAULTS = [
    (
        "rng",
        0,
        [],
        1,
        "writing .*step-000002.partial: OSError: .*injected: the RNG file could not be written",
    ),
    (
        "rng",
        1,
        [],
        1,
        "writing .*step-000002.partial: OSError: .*injected: the RNG file could not be written",
    ),
    ("dcp", 0, ["impl.parallel=fsdp"], 2, "the disk is full: writing .*step-000002"),
    ("dcp", 1, ["impl.parallel=fsdp"], 2, "the disk is full: writing .*step-000002"),
    ("step", 0, [], 1, "RuntimeError: injected: the step failed"),
    ("step", 1, [], 1, "RuntimeError: injected: the step failed"),
    ("hang", 0, [], 1, "RuntimeError: injected: the step failed"),
    ("hang", 1, [], 1, "RuntimeError: injected: the step failed"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "rank", "args", "code", "message"), FAULTS)
def test_a_fault_on_one_rank_ends_both_with_its_message_and_code(tmp_path, fault, rank, args, code, message):
    codes, errors, seconds = two_ranks(fault, rank, tmp_path / "run", *args)
    assert codes == [code, code], errors
    assert seconds < 60
    for stderr in errors:
        assert f"process {rank} failed: " in stderr, stderr[-2000:]
        assert re.search(message, stderr), stderr[-2000:]
        assert "Traceback" not in stderr, stderr[-3000:]
    assert not list((tmp_path / "run" / "checkpoints").glob("*.partial"))
    for _, checkpoint in complete_checkpoints(tmp_path / "run"):
        verify_checkpoint(checkpoint)


@pytest.mark.slow
def test_a_write_only_the_main_process_makes_ends_both_ranks(tmp_path):
    (tmp_path / "run" / "metrics.jsonl").mkdir(parents=True)  # the run log cannot be written
    codes, errors, seconds = two_ranks("none", 0, tmp_path / "run")
    assert codes == [1, 1], errors
    assert seconds < 60
    for stderr in errors:
        assert "process 0 failed: IsADirectoryError" in stderr and "metrics.jsonl" in stderr, stderr[-2000:]
        assert "Traceback" not in stderr, stderr[-3000:]
    assert (tmp_path / "run" / "error-rank0.log").read_text().startswith("Traceback")
