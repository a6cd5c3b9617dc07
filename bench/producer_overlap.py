"""Data off the critical path: the training step with the background batch producer against the same
step with batches made inline, and the loader's own speed per core (what sizes CPU workers).

Both sides are `mlm-pretrain pretrain` runs of one recipe on the shared corpus, differing only in
`impl.prefetch` (2 against 0), alternated A B A B; the figure is the median time per step over the
run's logged windows after the first (compilation and start-up excluded). The model is small enough
that tokenizing, packing and masking are a visible share of a step; on a large model or a GPU the
share is smaller on the step side and larger on the loader side.

    python -m bench.producer_overlap --data ../shared/data --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench.measure import machine
from bench.sides import DEFAULT_DATA, ROOT, mlm_pretrain, smoke_data


def run(out: Path, prefetch: int, args: argparse.Namespace) -> dict:
    argv = [
        "pretrain",
        "--recipe",
        str(ROOT / "recipes/tiny.yaml"),
        "--corpus",
        str(Path(args.data) / "corpus"),
    ]
    argv += ["--out", str(out), "--max-steps", str(args.steps), f"data.seq_len={args.seq}"]
    argv += [f"optim.batch_size={args.batch}", f"optim.micro_batch_size={args.batch}"]
    argv += [
        f"model.hidden_size={args.hidden}",
        f"model.num_layers={args.layers}",
        f"impl.prefetch={prefetch}",
    ]
    argv += [f"impl.threads={args.threads}", "impl.progress=false", f"log_every={max(1, args.steps // 20)}"]
    argv += [
        "eval_every=100000",
        "save_every=100000",
        "eval_blocks=8",
        f"model.intermediate_size={4 * args.hidden}",
    ]
    if mlm_pretrain(argv, inline=args.smoke, log=out.with_suffix(".log")) != 0:
        sys.exit(f"mlm-pretrain pretrain failed: {out.with_suffix('.log')}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")][1:]
    tokens_per_s = statistics.median(speeds)
    return {"tokens_per_s": tokens_per_s, "ms_per_step": 1000 * args.batch * args.seq / tokens_per_s}


def loader_speed(args: argparse.Namespace) -> float:
    """Tokens/s of `MLMBatches.make_step` alone in this process, one thread: tokenize, pack, mask."""
    import torch

    from mlm_pretrain.batches import MLMBatches
    from mlm_pretrain.corpus import TextStream
    from mlm_pretrain.packing import BlockStream, TokenInfo
    from mlm_pretrain.schema import MaskingRecipe
    from mlm_pretrain.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    os.environ["RAYON_NUM_THREADS"] = "1"  # the tokenizer's own threads: one core's worth
    tokenizer = load_tokenizer(ROOT / "tokenizers/default-wordpiece-8k")
    stream = BlockStream(
        TextStream([str(Path(args.data) / "corpus")], seed=0),
        tokenizer,
        args.seq,
        shuffle_buffer=1000,
        seed=0,
    )
    batches = MLMBatches(
        stream, TokenInfo(tokenizer), MaskingRecipe(), seed=0, micro_batch_size=args.batch, accumulation=1,
        device="cpu",
    )  # fmt: skip
    for _ in range(5):
        batches.make_step()
    started, steps = time.perf_counter(), args.loader_steps
    for _ in range(steps):
        batches.make_step()
    return steps * args.batch * args.seq / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-producer"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training step")
    parser.add_argument(
        "--loader-steps", type=int, default=200, help="steps of batches the loader alone makes"
    )
    parser.add_argument("--smoke", action="store_true", help="8 steps of a 2x64 model each way, seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.data = str(smoke_data())
        args.out, args.rounds, args.steps = str(Path(args.data) / "producer"), 1, 8
        args.seq, args.batch, args.loader_steps = 32, 8, 20
    print(machine(), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(f"model {args.layers}x{args.hidden}, seq {args.seq}, batch {args.batch}, {args.steps} steps")

    results: dict[str, list[dict]] = {"inline": [], "producer": []}
    for round_ in range(args.rounds):
        for side, depth in (("inline", 0), ("producer", 2)):
            out = Path(args.out) / f"{side}-{round_}"
            shutil.rmtree(out, ignore_errors=True)
            results[side].append(run(out, depth, args))
            print(f"round {round_ + 1} {side}: {results[side][-1]['ms_per_step']:.1f} ms/step", flush=True)
    inline = statistics.median(r["ms_per_step"] for r in results["inline"])
    producer = statistics.median(r["ms_per_step"] for r in results["producer"])
    loader = loader_speed(args)
    print("| side | ms/step (median) | tokens/s |")
    print("|---|---|---|")
    for side, ms in (("inline (impl.prefetch=0)", inline), ("producer (impl.prefetch=2)", producer)):
        print(f"| {side} | {ms:.1f} | {1000 * args.batch * args.seq / ms:,.0f} |")
    print(f"producer: {inline / producer:.2f}x faster per step than inline (>1 favours the producer)")
    print(f"loader alone, one core: {loader:,.0f} tokens/s (tokenize + pack + mask)")
    summary = {
        "inline_ms": inline,
        "producer_ms": producer,
        "loader_tokens_per_s_one_core": loader,
        **vars(args),
    }
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
