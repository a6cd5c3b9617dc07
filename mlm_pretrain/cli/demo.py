"""`mlm-pretrain demo`: the whole pipeline on the sample corpus shipped in the package."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the pipeline end to end on the sample corpus shipped in the package",
        description="Train a WordPiece tokenizer on the sample corpus (Austen and Moby Dick, public domain), "
        "then stream the corpus through it into packed 128-token blocks and print a summary. Runs offline.",
    )
    p.add_argument("--out", default="runs/demo", help="directory for everything the demo writes")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mlm_pretrain.corpus import TextStream
    from mlm_pretrain.packing import summarize_packing
    from mlm_pretrain.tokenizer import train_tokenizer

    tokenizer_dir = Path(args.out) / "tokenizer"
    print(f"1/2 training a WordPiece tokenizer on the sample corpus -> {tokenizer_dir}")
    report = train_tokenizer(
        TextStream(["@sample"], epochs=1, shuffle_files=False),
        tokenizer_dir,
        kind="wordpiece",
        vocab_size=8192,
        validation=TextStream(["@sample-validation"]),
    )
    print(
        f"    {report.vocab_size} tokens, UNK rate {report.unk_rate:.4f}, fertility {report.fertility:.3f} "
        f"tokens/word on held-out text, {report.train_seconds} s"
    )
    print("2/2 streaming the sample corpus into packed 128-token blocks")
    print(summarize_packing(["@sample"], str(tokenizer_dir), 128))
    return 0
