"""Evaluation that does not depend on the launcher: the same weights score the same (loss, accuracy,
masked-token count) in 1, 2 and 3 processes, under DDP and FSDP, on a validation set whose blocks and
micro-batches divide by none of those counts; it never hangs."""

import json
import subprocess
import sys

import pytest
from conftest import DATA
from test_trainer import ROOT

from mlm_pretrain.corpus import TextStream
from mlm_pretrain.packing import BlockStream
from mlm_pretrain.tokenizer import load_tokenizer

MICRO = 2  # tests/eval_ranks.py's micro-batch size


def ragged_validation(tmp_path, checkpoint):
    """A validation file whose block count and micro-batch count divide by neither 2 nor 3."""
    tokenizer = load_tokenizer(checkpoint)
    lines = (DATA / "austen_8k.txt").read_text(encoding="utf-8").splitlines()
    for n in range(10, len(lines)):
        path = tmp_path / "validation.txt"
        path.write_text("\n".join(lines[:n]) + "\n")
        blocks = sum(1 for _ in BlockStream(TextStream([str(path)], shuffle_files=False), tokenizer, 32))
        micro_batches = -(-blocks // MICRO)
        if all(blocks % k and micro_batches % k for k in (2, 3)):
            return path
    raise AssertionError("no ragged validation set found")


def evaluate_in(processes: int, parallel: str, checkpoint, validation, tmp_path) -> dict:
    out = tmp_path / f"{parallel}-{processes}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command += ["--standalone", "tests/eval_ranks.py", str(checkpoint), str(validation), parallel, str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_the_same_weights_score_the_same_in_any_number_of_processes(tiny_checkpoint, tmp_path):
    validation = ragged_validation(tmp_path, tiny_checkpoint)
    one = evaluate_in(1, "ddp", tiny_checkpoint, validation, tmp_path)
    assert one["eval_masked_tokens"] > 0
    for parallel, processes in [("ddp", 2), ("ddp", 3), ("fsdp", 2), ("fsdp", 3)]:
        other = evaluate_in(processes, parallel, tiny_checkpoint, validation, tmp_path)
        assert other["eval_masked_tokens"] == one["eval_masked_tokens"], (parallel, processes)
        for key in ("eval_loss", "eval_accuracy"):
            assert other[key] == pytest.approx(one[key], rel=1e-6, abs=1e-6), (parallel, processes, key)
