"""Tokenizer training: our `train_tokenizer` (streaming from a TextStream) against raw `tokenizers` training.

Both train on the same documents of the whole corpus with the same normalizer, pre-tokenizer and trainer
(`build_tokenizer_and_trainer`: lowercase, min_frequency 2): ours holds out every 100th document to
measure its report, so raw (`bench.peers.raw_tokenizer_training`) gets the same 99% of the documents, read
into a Python list first and fed as lists of 1000 texts (`--raw-batch`), as the `tokenizers` docs advise
(ours feeds batches of 1000 too); the read is timed apart. Each side runs in its
own process (its own peak RSS), the sides alternating round by round.

"train s" is the `train_from_iterator` call: for ours it includes streaming the files (the reading happens
inside it), for raw it does not. "total s" is ours's whole `train_tokenizer` (training, saving, measuring
the held-out documents) and raw's read + train. "x raw's time" is ours's train s over raw's: above 1 ours
is that many times slower, below 1 faster.

    python -m bench.tokenizer_speed                        # WordPiece and byte-level BPE, vocab 30522
    python -m bench.tokenizer_speed --kinds wordpiece --keep /tmp/wp30k   # keep ours for loader_speed
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

from bench.measure import machine
from bench.sides import DEFAULT_DATA, direction, median, report, run_side, smoke_data, table


def vocab_digest(vocab: dict[str, int]) -> str:
    return hashlib.sha1(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:12]


def side_ours(corpus: str, kind: str, vocab_size: int, keep: str | None) -> dict:
    from tokenizers import Tokenizer

    from mlm_pretrain.corpus import TextStream
    from mlm_pretrain.tokenizer import train_tokenizer

    out = keep or tempfile.mkdtemp(prefix="bench-tokenizer-")
    start = time.perf_counter()
    rep = train_tokenizer(
        TextStream([corpus], epochs=1, seed=0), out, kind=kind, vocab_size=vocab_size, progress=False
    )
    total = time.perf_counter() - start
    vocab = Tokenizer.from_file(str(Path(out) / "tokenizer.json")).get_vocab()
    if not keep:
        shutil.rmtree(out)
    return {
        "train": rep.train_seconds,
        "total": total,
        "docs": rep.documents_trained,
        "vocab": vocab_digest(vocab),
    }


def side_raw(corpus: str, kind: str, vocab_size: int, batch_size: int) -> dict:
    from bench.peers import raw_tokenizer_training
    from mlm_pretrain.corpus import TextStream
    from mlm_pretrain.tokenizer import HOLDOUT_EVERY

    start = time.perf_counter()
    docs = [
        d
        for i, d in enumerate(TextStream([corpus], epochs=1, seed=0))
        if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1
    ]
    read = time.perf_counter() - start
    train, tok = raw_tokenizer_training(docs, kind, vocab_size, batch_size)
    return {"train": train, "total": read + train, "docs": len(docs), "vocab": vocab_digest(tok.get_vocab())}


def main(argv: list[str] | None = None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--kinds", default="wordpiece,bpe")
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", help="save ours's (first kind's) tokenizer here")
    parser.add_argument("--raw-batch", type=int, default=1000, help="texts per list fed to the raw side")
    parser.add_argument("--smoke", action="store_true", help="a 2k vocabulary on the repo's sample, seconds")
    parser.add_argument("--side", choices=("ours", "raw"), help=argparse.SUPPRESS)  # internal: run one side
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.data, args.vocab_size, args.rounds = str(smoke_data()), 2000, 1
    corpus = str(Path(args.data) / "corpus")

    if args.side == "ours":
        return report(side_ours(corpus, args.kind, args.vocab_size, args.keep))
    if args.side == "raw":
        return report(side_raw(corpus, args.kind, args.vocab_size, args.raw_batch))

    print(machine(), flush=True)
    kinds = args.kinds.split(",")
    runs: dict[tuple[str, str], list[dict]] = {(k, s): [] for k in kinds for s in ("ours", "raw")}
    for round_ in range(args.rounds):
        for kind in kinds:
            for side in ("ours", "raw"):
                extra = ["--keep", args.keep] if side == "ours" and args.keep and kind == kinds[0] else []
                forwarded = [
                    "--data",
                    args.data,
                    "--kind",
                    kind,
                    "--vocab-size",
                    str(args.vocab_size),
                    "--raw-batch",
                    str(args.raw_batch),
                    *extra,
                ]
                result = run_side("tokenizer_speed", side, forwarded, inline=args.smoke)
                runs[kind, side].append(result)
                print(f"round {round_ + 1} {kind:9s} {side:4s} train {result['train']:6.1f} s", flush=True)

    rows, verdicts = [], []
    for (kind, side), results in runs.items():
        raw_train = median(runs[kind, "raw"], "train")
        rows.append(
            [
                kind,
                side,
                median(results, "train"),
                f"{median(results, 'train') / raw_train:.2f}",
                median(results, "total"),
                int(median(results, "rss_mb")),
                results[0]["docs"],
                results[0]["vocab"],
            ]
        )
        if side == "ours":
            speed = raw_train / median(results, "train")  # ours's speed over raw's
            per_round = ", ".join(
                f"{o['train'] / r['train']:.2f}" for o, r in zip(results, runs[kind, "raw"], strict=True)
            )
            rounds = f"ours's train s over raw's, per round: {per_round}"
            verdicts.append(f"{kind}: {direction(speed, 'raw')} ({rounds})")
    print(
        f"\n{corpus}: vocab {args.vocab_size}, raw fed lists of {args.raw_batch} texts, "
        f"medians of {args.rounds} rounds"
    )
    header = ["kind", "side", "train s", "x raw's time", "total s", "peak RSS MB", "documents", "vocab sha1"]
    print(table(header, rows))
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
