"""`mlm-pretrain pack`: stream a corpus through the tokenizer into packed blocks and summarise them."""

from __future__ import annotations

import argparse

from mlm_pretrain.cli.common import add_corpus_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pack",
        help="stream a corpus into packed blocks and print a summary (check the data before training)",
        description="Read the corpus as pretraining does (streaming, tokenized on the fly, packed into "
        "[CLS] ... [SEP] blocks RoBERTa FULL-SENTENCES style, no token dropped) and print what came out: "
        "documents, tokens, blocks, padding, bad input skipped or repaired, throughput, and a sample block.",
    )
    add_corpus_args(p)
    p.add_argument("--tokenizer", default="tokenizers/default-wordpiece-8k", help="tokenizer directory")
    p.add_argument("--seq-len", type=int, default=128, help="block length in tokens, special tokens included")
    p.add_argument("--shuffle-buffer", type=int, default=0, help="blocks held for shuffling (0: in order)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-blocks", type=int, help="stop after this many blocks (default: one full pass)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mlm_pretrain.packing import summarize_packing

    print(
        summarize_packing(
            args.corpus or ["@sample"],
            args.tokenizer,
            args.seq_len,
            weights=args.weights,
            text_field=args.text_field or "text",
            shuffle_buffer=args.shuffle_buffer,
            seed=args.seed,
            max_blocks=args.max_blocks,
        )
    )
    return 0
