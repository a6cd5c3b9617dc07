"""Arguments several commands share. (Not a subcommand.)"""

from __future__ import annotations

import argparse

import yaml

from mlm_pretrain.errors import InputError


def add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--corpus",
        nargs="+",
        metavar="PATH",
        help="text sources: files (.txt .txt.gz .jsonl .jsonl.gz .parquet .csv .tsv), directories, "
        "globs, Hub datasets as hf:NAME[:CONFIG][@SPLIT] (NAME a Hub id or a local directory in Hub "
        "layout), or @sample (the small corpus shipped with the "
        "package)",
    )
    p.add_argument(
        "--weights",
        nargs="+",
        type=float,
        metavar="W",
        help="interleaving weights, one per --corpus source (default: equal)",
    )
    p.add_argument("--text-field", help="field holding the text in .jsonl/.parquet/.csv/Hub sources [text]")


def corpus_overrides(args: argparse.Namespace, prefix: str = "") -> list[str]:
    """Recipe overrides for --corpus/--weights/--text-field, as `key=value` strings under `prefix`."""
    out = []
    if args.corpus:
        weights = args.weights or [1.0] * len(args.corpus)
        if len(weights) != len(args.corpus):
            raise InputError(f"--weights has {len(weights)} values for {len(args.corpus)} --corpus sources")
        sources = [{"path": p, "weight": w} for p, w in zip(args.corpus, weights, strict=True)]
        out.append(f"{prefix}corpus={yaml.safe_dump(sources, default_flow_style=True).strip()}")
    if args.text_field:
        out.append(f"{prefix}text_field={args.text_field}")
    return out


def require_at_least_one(args: argparse.Namespace, *names: str) -> None:
    """Refuse a count option below 1 (--seeds 0, ...), naming it, before any work starts."""
    for name in names:
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
