"""Resume cost: `BlockStream.load_state_dict(state)` against re-reading the stream and discarding blocks.

One reference stream (`epochs=None`, file order shuffled, a shuffle buffer of 1000 blocks) runs past 10M
tokens; its state is saved after 1M, 5M and 10M packed tokens (10M is in the second epoch: the corpus is
~6.7M tokens with the 8k tokenizer), and at the deepest position inside a .gz file it passed (gzip cannot
seek, so restoring there decompresses everything before it: the worst case). At each point:

restore  a fresh stream, `load_state_dict(state)`, then
         "first block": the first block out (it comes from the saved shuffle buffer and pending tokens),
         "first read": the first block after the stream had to read new text, i.e. after the file seek
         (for .gz, the decompression up to the position) and a tokenized batch: the real cost of resuming.
naive    a fresh stream iterated from the start, the blocks before the point discarded (`.skip(n)`'s way).

Both are checked against the reference: the restored stream must yield exactly the blocks it yielded
next (through the first read and 16 more), the naive one its first block. Rounds alternate restore/naive.

    python -m bench.resume_cost
    python -m bench.resume_cost --points 1e6,5e6 --rounds 1
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import pickle
import statistics
import sys
import time
from pathlib import Path

from bench.sides import smoke_data, stream_arguments, table
from mlm_pretrain.corpus import TextStream
from mlm_pretrain.packing import BlockStream
from mlm_pretrain.tokenizer import load_tokenizer

AFTER_FIRST_READ = 16  # blocks compared after the first fresh read
SAMPLE_EVERY = 64  # blocks between looks for the deepest .gz position


def digest(block) -> bytes:
    return hashlib.blake2b(block.tobytes(), digest_size=8).digest()


class Setup:
    def __init__(self, corpus: str, tokenizer_dir: str, seq_len: int, shuffle_buffer: int):
        self.corpus, self.seq_len, self.shuffle_buffer = corpus, seq_len, shuffle_buffer
        self.tokenizer = load_tokenizer(tokenizer_dir)

    def stream(self) -> BlockStream:
        documents = TextStream([self.corpus], seed=0, shuffle_files=True, epochs=None)
        return BlockStream(
            documents, self.tokenizer, self.seq_len, shuffle_buffer=self.shuffle_buffer, seed=0
        )

    @staticmethod
    def where(stream: BlockStream, state: dict) -> tuple[str, int, int]:
        """(file, byte offset, epoch) of the deepest position a restore from `state` seeks to: the files
        of a source are read together, a group at a time."""
        from mlm_pretrain.corpus import INTERLEAVED_FILES

        pos = state["text"]["positions"][0]
        reader = stream.documents.readers[0]
        group = reader.file_order(pos["epoch"])[pos["group"] * INTERLEAVED_FILES :]
        open_files = [(at[0], reader.files[i].name) for i, at in zip(group, pos["files"], strict=False) if at]
        offset, name = max(open_files, default=(0, "(end of group)"))
        return name, offset, pos["epoch"]


class Point:
    """A saved state and the blocks the reference stream yielded after it."""

    def __init__(self, label: str, stream: BlockStream):
        self.label = label
        self.state = stream.state_dict()
        self.blocks_before = stream.blocks_made
        self.where = Setup.where(stream, self.state)
        self.expected: list[bytes] = []
        self.first_read_at: int | None = None  # index in `expected` of the first block after a fresh read
        self.state_kb = len(pickle.dumps(self.state)) / 1024

    def record(self, stream: BlockStream, block) -> bool:
        """Note the reference's next block; False once enough are noted."""
        self.expected.append(digest(block))
        if self.first_read_at is None and stream.tokens_read != self.state["tokens_read"]:
            self.first_read_at = len(self.expected) - 1
        return self.first_read_at is None or len(self.expected) <= self.first_read_at + AFTER_FIRST_READ


def reference(setup: Setup, points: list[int]) -> tuple[list[Point], float]:
    """Run the reference stream past the last point; save states there and at the deepest .gz position."""
    stream = setup.stream()
    targets = sorted(points)
    saved: list[Point] = []
    recording: list[Point] = []
    deepest: Point | None = None
    start = time.perf_counter()
    for i, block in enumerate(stream):
        recording = [p for p in recording if p.record(stream, block)]
        if targets and stream.tokens_packed >= targets[0]:
            saved.append(Point(f"{targets.pop(0) / 1e6:g}M tokens", stream))
            recording.append(saved[-1])
        elif i % SAMPLE_EVERY == 0:
            name, offset, _ = Setup.where(stream, stream.state_dict())
            if name.endswith(".gz") and (deepest is None or offset > deepest.where[1]):
                if deepest in recording:
                    recording.remove(deepest)
                deepest = Point(f"deepest .gz ({stream.tokens_packed / 1e6:.1f}M tokens)", stream)
                recording.append(deepest)
        if not targets and not recording:
            break
    seconds = time.perf_counter() - start
    return saved + ([deepest] if deepest else []), stream.tokens_read / seconds


def restore(setup: Setup, point: Point) -> tuple[float, float]:
    """Seconds to (the first block, the first block after a fresh read) of a restored stream; checks all."""
    stream = setup.stream()
    state = copy.deepcopy(point.state)  # load_state_dict may keep references; the point's state stays clean
    got = []
    start = time.perf_counter()
    stream.load_state_dict(state)
    it = iter(stream)
    got.append(digest(next(it)))
    first = time.perf_counter() - start
    while len(got) <= point.first_read_at:
        got.append(digest(next(it)))
    first_read = time.perf_counter() - start
    got += [digest(next(it)) for _ in range(len(point.expected) - len(got))]
    if got != point.expected:
        sys.exit(f"{point.label}: the restored stream yields other blocks than the original")
    return first, first_read


def naive(setup: Setup, point: Point) -> float:
    """Seconds to reach the point's first block by iterating from the start and discarding the rest."""
    stream = setup.stream()
    start = time.perf_counter()
    it = iter(stream)
    for _ in range(point.blocks_before):
        next(it)
    block = next(it)
    seconds = time.perf_counter() - start
    if digest(block) != point.expected[0]:
        sys.exit(f"{point.label}: the naive skip yields another block than the original")
    return seconds


def main(argv: list[str] | None = None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    stream_arguments(parser)
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--points", default="1e6,5e6,1e7", help="packed tokens at which states are saved")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--smoke", action="store_true", help="states at 5k and 20k tokens of the repo's sample"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.data, args.points, args.rounds, args.shuffle_buffer = str(smoke_data()), "5e3,2e4", 1, 100

    setup = Setup(str(Path(args.data) / "corpus"), args.tokenizer, args.seq_len, args.shuffle_buffer)
    points, tps = reference(setup, [int(float(p)) for p in args.points.split(",")])
    print(f"reference stream: {tps:,.0f} tokens/s", flush=True)
    times: dict[str, dict[str, list[float]]] = {
        p.label: {"first": [], "read": [], "naive": []} for p in points
    }
    for round_ in range(args.rounds):
        for point in points:
            first, first_read = restore(setup, point)
            times[point.label]["first"].append(first)
            times[point.label]["read"].append(first_read)
            times[point.label]["naive"].append(naive(setup, point))
            print(
                f"round {round_ + 1} {point.label:28s} restore {first:.3f} s / {first_read:.3f} s, "
                f"naive {times[point.label]['naive'][-1]:.1f} s",
                flush=True,
            )

    rows = []
    for point in points:
        t = {k: statistics.median(v) for k, v in times[point.label].items()}
        name, offset, epoch = point.where
        rows.append(
            [
                point.label,
                f"{name} @ {offset / 1e6:.1f} MB, epoch {epoch + 1}",
                round(point.state_kb),
                f"{t['first']:.3f}",
                f"{t['read']:.3f}",
                f"{t['naive']:.1f}",
                f"{t['naive'] / t['read']:,.0f}x",
                f"yes ({len(point.expected)} blocks)",
            ]
        )
    print(f"\n{setup.corpus}: shuffle buffer {args.shuffle_buffer}, seq_len {args.seq_len}, medians")
    header = ["state after", "text position", "state KB", "restore: 1st block s", "1st read s", "naive s"]
    print(table([*header, "naive / restore", "identical"], rows))


if __name__ == "__main__":
    main()
