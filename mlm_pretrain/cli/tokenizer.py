"""`mlm-pretrain tokenizer`: train a WordPiece, byte-level BPE or Unigram tokenizer on a corpus."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from mlm_pretrain.cli.common import add_corpus_args, corpus_overrides


@dataclass
class TokenizerRecipe:
    corpus: list[str | dict] = field(default_factory=lambda: ["@sample"])
    text_field: str = "text"
    type: str = "wordpiece"
    vocab_size: int = 30522
    lowercase: bool = True
    min_frequency: int = 2
    max_chars: int | None = 1_000_000_000
    model_max_length: int = 512
    validation: list[str] = field(default_factory=list)
    out: str = "tokenizers/tokenizer"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenizer",
        help="train a tokenizer (WordPiece, byte-level BPE or Unigram) from a corpus",
        description="Train a BERT-style WordPiece, RoBERTa-style byte-level BPE or SentencePiece-style "
        "Unigram tokenizer from the streaming corpus, and save a directory AutoTokenizer.from_pretrained "
        "loads, with tokenizer_report.json (vocabulary size, UNK rate and fertility on held-out text, "
        "time, memory). Flags override the recipe's keys.",
    )
    p.add_argument("--recipe", help="YAML recipe with the keys below (e.g. recipes/tokenizer-default.yaml)")
    add_corpus_args(p)
    p.add_argument(
        "--type",
        choices=["wordpiece", "bpe", "unigram"],
        default=None,
        help="wordpiece: BERT ([CLS] [SEP] [MASK] [PAD] [UNK]); bpe: RoBERTa byte-level; "
        "unigram: SentencePiece-style with Metaspace (both with <s> </s> <mask> <pad> <unk>) "
        "[recipe default: wordpiece]",
    )
    p.add_argument("--vocab-size", type=int, help="vocabulary size, special tokens included [30522]")
    p.add_argument(
        "--cased",
        dest="lowercase",
        action="store_false",
        default=None,
        help="keep case (default: lowercase and strip accents, as bert-base-uncased)",
    )
    p.add_argument("--min-frequency", type=int, help="drop merges/pieces seen fewer times [2]")
    p.add_argument(
        "--max-chars",
        type=int,
        help="read at most this many characters of the corpus, bounding time and memory [1e9]",
    )
    p.add_argument("--model-max-length", type=int, help="model_max_length saved with the tokenizer [512]")
    p.add_argument(
        "--validation",
        nargs="+",
        metavar="PATH",
        help="held-out text for the report (default: every 100th corpus document, not trained on)",
    )
    p.add_argument("--out", help="output directory [tokenizers/tokenizer]")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from mlm_pretrain.corpus import TextStream
    from mlm_pretrain.recipe import load_recipe
    from mlm_pretrain.tokenizer import train_tokenizer

    flags = {
        "type": args.type,
        "vocab_size": args.vocab_size,
        "lowercase": args.lowercase,
        "min_frequency": args.min_frequency,
        "max_chars": args.max_chars,
        "model_max_length": args.model_max_length,
        "validation": args.validation,
        "out": args.out,
    }
    overrides = [
        *args.overrides,
        *corpus_overrides(args),
        *(f"{k}={v}" for k, v in flags.items() if v is not None),
    ]
    recipe = load_recipe(TokenizerRecipe, args.recipe, overrides)
    documents = TextStream(recipe.corpus, text_field=recipe.text_field, shuffle_files=False, epochs=1)
    validation = TextStream(recipe.validation, text_field=recipe.text_field) if recipe.validation else None
    report = train_tokenizer(
        documents,
        recipe.out,
        kind=recipe.type,
        vocab_size=recipe.vocab_size,
        lowercase=recipe.lowercase,
        min_frequency=recipe.min_frequency,
        max_chars=recipe.max_chars,
        model_max_length=recipe.model_max_length,
        validation=validation,
    )
    for key, value in asdict(report).items():
        print(f"{key:>22}: {value}")
    print(f"saved to {recipe.out} (load with AutoTokenizer.from_pretrained({recipe.out!r}))")
    return 0
