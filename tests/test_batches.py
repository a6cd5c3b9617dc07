"""The background batch producer: the same steps as inline, the state of the last step consumed, its
errors raised in the loop with their file and line, and a clean stop."""

import gzip
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from mlm_pretrain.batches import MLMBatches, Prefetched, prefetched
from mlm_pretrain.corpus import TextStream
from mlm_pretrain.packing import BlockStream, TokenInfo
from mlm_pretrain.schema import MaskingRecipe
from mlm_pretrain.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ROOT / "tokenizers/default-wordpiece-8k")


def source(tokenizer) -> MLMBatches:
    stream = BlockStream(TextStream(["@sample"], seed=0), tokenizer, 32, shuffle_buffer=16, seed=0)
    return MLMBatches(
        stream,
        TokenInfo(tokenizer),
        MaskingRecipe(),
        seed=0,
        micro_batch_size=4,
        accumulation=2,
        device="cpu",
    )


def same(a, b) -> bool:
    return all(
        x is y is None or torch.equal(x, y)
        for ma, mb in zip(a.micro_batches, b.micro_batches, strict=True)
        for x, y in zip(vars(ma).values(), vars(mb).values(), strict=True)
    )


def test_the_producer_gives_the_inline_steps_and_the_state_of_the_last_one_consumed(tokenizer):
    inline = source(tokenizer)
    expected = [next(inline) for _ in range(6)]
    with prefetched(source(tokenizer), 3) as steps:
        for want in expected[:3]:
            assert same(next(steps), want)
        time.sleep(0.3)  # let it run ahead of the loop: the queue fills
        state = steps.state_dict()
    assert state["step"] == 3  # consumed, not produced
    resumed = source(tokenizer)
    resumed.load_state_dict(state)
    for want in expected[3:]:
        assert same(next(resumed), want)


def test_a_crash_in_the_producer_is_raised_in_the_loop_with_its_file_and_line(tokenizer):
    batches = source(tokenizer)
    made = 0

    def failing_make_step():
        nonlocal made
        made += 1
        if made == 3:
            raise OSError("disk went away")  # the line the traceback must show
        return MLMBatches.make_step(batches)

    batches.make_step = failing_make_step
    with prefetched(batches, 2) as steps:
        next(steps), next(steps)
        with pytest.raises(OSError, match="disk went away") as raised:
            next(steps)
    frames = traceback.extract_tb(raised.value.__traceback__)
    assert any(f.filename == __file__ and f.name == "failing_make_step" for f in frames)


def test_closing_stops_a_producer_blocked_on_a_full_queue(tokenizer):
    producer = Prefetched(source(tokenizer), 1)
    time.sleep(0.3)  # made one step and waits to hand over the next
    started = time.perf_counter()
    producer.close()
    assert not producer._thread.is_alive() and time.perf_counter() - started < 2


@pytest.mark.slow
def test_a_corpus_that_breaks_mid_run_ends_the_job_with_its_error_not_a_hang(tmp_path):
    """The producer reads the corpus; a truncated .gz ends the run with the reader's error naming it."""
    text = (ROOT / "tests/data/austen_8k.txt").read_text().splitlines() * 40
    data = gzip.compress("\n".join(text).encode())
    corpus = tmp_path / "broken.txt.gz"
    corpus.write_bytes(data[: len(data) * 2 // 3])
    cmd = [sys.executable, "-m", "mlm_pretrain", "pretrain", "--recipe", str(ROOT / "recipes/tiny.yaml")]
    cmd += ["--corpus", str(corpus), "--out", str(tmp_path / "run"), "--max-steps", "100000"]
    cmd += ["data.seq_len=32", "optim.batch_size=8", "optim.micro_batch_size=8", "impl.progress=false"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and str(corpus) in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_run_with_the_producer_trains_exactly_as_one_without(tmp_path):
    from safetensors.torch import load_file
    from test_trainer import pretrain

    for depth in (0, 2):
        pretrain(tmp_path / str(depth), "--max-steps", "8", "eval_every=100", f"impl.prefetch={depth}")
    a, b = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("0", "2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
