"""Loader throughput: our stream → tokenize → pack against the run_mlm.py way, and the raw tokenizer.

Sides, each in its own process (so its peak RSS is its own), alternated round by round:

ours     `BlockStream(TextStream(corpus), tokenizer, 128)` iterated to the end, as a training loop would.
run_mlm  HF examples/pytorch/language-modeling/run_mlm.py's preprocessing (`bench.peers`) as a user would
         run it on these files, with `--preprocessing_num_workers 2` (`--num-proc` changes it).
         Each run gets a fresh, empty HF_DATASETS_CACHE, so no run reuses another's Arrow cache.
run_mlm_default  the same at run_mlm.py's default, `--preprocessing_num_workers` unset: `num_proc=None`,
         both maps in the main process.
raw      the fast tokenizer's `encode_batch` (and `encode_batch_fast`) over the same documents already in
         memory (`bench.peers.raw_encode`): the ceiling, as it neither reads files nor packs.

tokens/s counts document tokens (no [CLS]/[SEP]/[PAD]) tokenized per wall-clock second, the same count
for every side. "delivered" is the document tokens that come out inside blocks; run_mlm's group_texts
drops the remainder of every 1000-row map batch. The ratio columns are speed ratios (a side's tokens/s over
the run_mlm side's): above 1 the side is that many times faster.

    python -m bench.loader_speed                                   # the default 8k WordPiece
    python -m bench.loader_speed --tokenizer /tmp/wp30k --rounds 3 # e.g. one tokenizer_speed --keep made
    python -m bench.loader_speed --scales 1 4 16 --sides ours,run_mlm_default \
        --png bench/results/loader_scaling.png

`--scales` runs every side on the corpus repeated N times (N links to each of its files, in a temporary
directory): a streaming loader's tokens/s and peak memory should not change with N. Each round runs every
size in turn (x1, x4, x16, x1, ...), so the machine's drift does not pass for a trend.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.measure import cpu_seconds, machine
from bench.sides import (
    direction,
    median,
    pyplot,
    report,
    run_side,
    save_figure,
    smoke_data,
    stream_arguments,
    table,
)

SIDES = ("ours", "run_mlm", "run_mlm_default", "raw")


def side_ours(corpus: str, tokenizer_dir: str, seq_len: int, shuffle_buffer: int) -> dict:
    from mlm_pretrain.corpus import TextStream
    from mlm_pretrain.packing import BlockStream
    from mlm_pretrain.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    start, cpu = time.perf_counter(), cpu_seconds()
    documents = TextStream([corpus], epochs=1, seed=0)
    stream = BlockStream(documents, tokenizer, seq_len, shuffle_buffer=shuffle_buffer, seed=0)
    blocks = sum(1 for _ in stream)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    assert stream.tokens_read == stream.tokens_packed
    docs = documents.stats["documents"]  # every document is followed by exactly one separator
    return {
        "seconds": seconds,
        "cpu": cpu,
        "doc_tokens": stream.tokens_read - docs,
        "delivered": stream.tokens_packed - docs,
        "blocks": blocks,
    }


def side_run_mlm(corpus: str, tokenizer_dir: str, seq_len: int, num_proc: int | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="hf-datasets-cache-") as cache:
        os.environ["HF_DATASETS_CACHE"] = cache  # before `datasets` is imported: a cold cache every run
        import datasets
        import numpy as np
        import pyarrow.compute as pc

        from bench.peers import run_mlm_preprocessing
        from mlm_pretrain.tokenizer import load_tokenizer

        datasets.disable_progress_bars()
        tokenizer = load_tokenizer(tokenizer_dir)
        start, cpu = time.perf_counter(), cpu_seconds()
        tokenized, grouped = run_mlm_preprocessing(corpus, tokenizer, seq_len, num_proc)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu  # the workers' CPU included

        specials = np.array(sorted({tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}))

        def doc_tokens(ds) -> int:
            ids = pc.list_flatten(ds.data.column("input_ids")).to_numpy()
            return int((~np.isin(ids, specials)).sum())

        return {
            "seconds": seconds,
            "cpu": cpu,
            "doc_tokens": doc_tokens(tokenized),
            "delivered": doc_tokens(grouped),
            "blocks": len(grouped),
        }


def side_raw(corpus: str, tokenizer_dir: str) -> dict:
    from bench.peers import raw_encode
    from mlm_pretrain.corpus import TextStream
    from mlm_pretrain.tokenizer import load_tokenizer

    backend = load_tokenizer(tokenizer_dir).backend_tokenizer
    docs = list(TextStream([corpus], epochs=1, seed=0))
    figures = {}
    for method in ("encode_batch", "encode_batch_fast"):
        start_cpu = cpu_seconds()
        figures[f"seconds_{method}"], figures["doc_tokens"] = raw_encode(backend, docs, method)
        figures[f"cpu_{method}"] = cpu_seconds() - start_cpu
    return figures


def main(argv: list[str] | None = None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    stream_arguments(parser)
    parser.add_argument(
        "--num-proc", type=int, default=2, help="the run_mlm side's --preprocessing_num_workers"
    )
    parser.add_argument("--shuffle-buffer", type=int, default=0, help="ours: blocks in the shuffle buffer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument(
        "--scales", nargs="+", type=int, default=[1], help="corpus sizes, as repetitions of the corpus"
    )
    parser.add_argument("--png", help="draw tokens/s and peak RSS against corpus size (with --scales)")
    parser.add_argument("--smoke", action="store_true", help="every side once on the repo's sample, seconds")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: run one side
    parser.add_argument("--corpus", help=argparse.SUPPRESS)  # internal: the (repeated) corpus directory
    args = parser.parse_args(argv)
    if args.smoke:
        args.data = str(smoke_data())
        args.rounds, args.scales, args.png = 1, [1, 2], str(Path(args.data) / "loader_scaling.png")
    corpus = args.corpus or str(Path(args.data) / "corpus")

    if args.side == "ours":
        return report(side_ours(corpus, args.tokenizer, args.seq_len, args.shuffle_buffer))
    if args.side == "run_mlm":
        return report(side_run_mlm(corpus, args.tokenizer, args.seq_len, args.num_proc))
    if args.side == "run_mlm_default":
        return report(side_run_mlm(corpus, args.tokenizer, args.seq_len, None))
    if args.side == "raw":
        return report(side_raw(corpus, args.tokenizer))

    print(machine(), flush=True)
    with tempfile.TemporaryDirectory(prefix="corpus-repeated-") as repeated:
        corpora = {}
        for scale in args.scales:
            corpora[scale] = Path(repeated) / f"x{scale}"
            corpora[scale].mkdir()
            for i in range(scale):
                for file in sorted(Path(corpus).iterdir()):
                    (corpora[scale] / f"copy{i}-{file.name}").symlink_to(file.resolve())
        runs = run_rounds(args, corpora)
    scaling = []
    for scale in args.scales:
        print(f"\ncorpus x{scale}: {len(list(Path(corpus).iterdir())) * scale} files")
        print_comparison(args, runs[scale])
        scaling += [[f"x{scale}", side, *figures(side_runs)] for side, side_runs in runs[scale].items()]
    if len(args.scales) > 1:
        print(f"\nhow the loader scales with corpus size (medians of {args.rounds} rounds)")
        print(table(["corpus", "side", "tokens/s", "tokens/CPU-s", "seconds", "peak RSS MB"], scaling))
        if args.png:
            plot_scaling(scaling, Path(args.png))


def rate(runs: list[dict], key: str) -> float:
    """Document tokens per unit of `key` (wall or CPU seconds), the median over a side's rounds."""
    return median([{"v": r["doc_tokens"] / r[key]} for r in runs], "v")


def figures(runs: list[dict]) -> list:
    """tokens/s, tokens/CPU-second, seconds and peak RSS of a side (medians over rounds)."""
    seconds = "seconds" if "seconds" in runs[0] else "seconds_encode_batch"
    cpu = "cpu" if "cpu" in runs[0] else "cpu_encode_batch"
    return [rate(runs, seconds), rate(runs, cpu), median(runs, seconds), int(median(runs, "rss_mb"))]


def run_rounds(args: argparse.Namespace, corpora: dict[int, Path]) -> dict[int, dict[str, list[dict]]]:
    """Every side on every corpus size, each round going through all of them, so a machine that speeds
    up or slows down during the run shifts every size alike rather than biasing the scaling."""
    sides = args.sides.split(",")
    forwarded = ["--data", args.data, "--tokenizer", args.tokenizer, "--seq-len", str(args.seq_len)]
    forwarded += ["--num-proc", str(args.num_proc), "--shuffle-buffer", str(args.shuffle_buffer)]
    runs: dict[int, dict[str, list[dict]]] = {scale: {side: [] for side in sides} for scale in corpora}
    for round_ in range(args.rounds):
        for scale, corpus in corpora.items():
            for side in sides:
                result = run_side(
                    "loader_speed", side, [*forwarded, "--corpus", str(corpus)], inline=args.smoke
                )
                runs[scale][side].append(result)
                seconds = result.get("seconds", result.get("seconds_encode_batch"))
                print(f"round {round_ + 1} x{scale:<3d} {side:15s} {seconds:6.1f} s", flush=True)
    return runs


def print_comparison(args: argparse.Namespace, runs: dict[str, list[dict]]) -> None:
    """The table of one corpus size: each side's medians, and its speed ratio to the run_mlm sides."""
    sides = list(runs)
    peers = {"run_mlm": f"run_mlm num_proc={args.num_proc}", "run_mlm_default": "run_mlm default"}
    peers = {side: name for side, name in peers.items() if side in runs}
    rows = []
    for side in sides:
        for variant in [""] if side != "raw" else ["_encode_batch", "_encode_batch_fast"]:
            first = runs[side][0]
            delivered = first.get("delivered", "-")
            speed = rate(runs[side], "seconds" + variant)
            rows.append(
                [
                    side + variant.replace("_", " ", 1),
                    speed,
                    *(speed / rate(runs[peer], "seconds") for peer in peers),
                    rate(runs[side], "cpu" + variant),
                    median(runs[side], "seconds" + variant),
                    first["doc_tokens"],
                    delivered,
                    first["doc_tokens"] - delivered if side != "raw" else "-",
                    int(median(runs[side], "rss_mb")),
                    int(median(runs[side], "child_rss_mb")) if side == "run_mlm" else "-",
                ]
            )
    print(f"tokenizer {args.tokenizer}, seq_len {args.seq_len}, medians of {args.rounds} rounds")
    header = ["side", "tokens/s", *(f"x {name} speed" for name in peers.values()), "tokens/CPU-s", "s"]
    header += ["doc tokens", "delivered", "dropped", "RSS MB", "worker MB"]
    print(table(header, rows))
    if "ours" in runs:
        for peer, name in peers.items():
            ratio = rate(runs["ours"], "seconds") / rate(runs[peer], "seconds")
            per_cpu = rate(runs["ours"], "cpu") / rate(runs[peer], "cpu")
            print(f"{direction(ratio, name)} in tokens/s; per CPU-second {direction(per_cpu, name)}")


def plot_scaling(rows: list[list], png: Path) -> None:
    """tokens/s and peak RSS of each side against corpus size, from the scaling table's rows."""
    figure, axes = pyplot().subplots(1, 2, figsize=(10, 4))
    for side in dict.fromkeys(row[1] for row in rows):
        mine = [row for row in rows if row[1] == side]
        scales = [int(row[0][1:]) for row in mine]
        axes[0].plot(scales, [row[2] for row in mine], marker="o", label=side)
        axes[1].plot(scales, [row[5] for row in mine], marker="o", label=side)
    for axis, label in zip(axes, ["tokens/s", "peak RSS (MB)"], strict=True):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("corpus size (repetitions of the shared corpus)")
        axis.set_ylabel(label)
        axis.set_ylim(bottom=0)
        axis.legend()
    save_figure(figure, png, machine().split(";")[0])


if __name__ == "__main__":
    main()
