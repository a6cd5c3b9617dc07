"""Train BERT-, RoBERTa- and SentencePiece-style tokenizers from the streaming corpus; load them safely.

A trained tokenizer is a directory `AutoTokenizer.from_pretrained(dir)` loads with no custom code: the
model type's special tokens, a post-processor that adds them, `mask_token_id` and `model_max_length`
set. `tokenizer_report.json` beside it records vocabulary size, UNK rate and fertility (tokens per
whitespace word) on held-out text, training time and peak memory.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mlm_pretrain.errors import InputError

KINDS = ("wordpiece", "bpe", "unigram")
BERT_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
ROBERTA_SPECIALS = {"cls": "<s>", "pad": "<pad>", "sep": "</s>", "unk": "<unk>", "mask": "<mask>"}
HOLDOUT_EVERY = 100  # every 100th document is held out of training to measure the report's figures
HOLDOUT_MAX = 2000
TOKENIZER_CONFIG = "tokenizer_config.json"
# tokenizer_config.json as transformers 5 writes it -> what 4.x and 5 both load (see `save_tokenizer`)
V4_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
LOAD_ARGUMENTS = ("is_local", "local_files_only")


@dataclass
class TokenizerReport:
    kind: str
    vocab_size: int
    lowercase: bool
    documents_trained: int
    characters_trained: int
    validation_documents: int
    validation_words: int
    unk_rate: float  # share of validation tokens that are the unknown token
    fertility: float  # validation tokens per whitespace-separated word
    train_seconds: float
    peak_rss_mb: float  # of the whole process, read at the end


def specials_for(kind: str) -> dict[str, str]:
    return BERT_SPECIALS if kind == "wordpiece" else ROBERTA_SPECIALS


def build_tokenizer_and_trainer(kind: str, vocab_size: int, lowercase: bool, min_frequency: int):
    """An untrained `tokenizers.Tokenizer` of `kind` and the trainer that fills it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind not in KINDS:
        raise InputError(f"unknown tokenizer type {kind!r}; valid: {', '.join(KINDS)}")
    specials = specials_for(kind)
    # special tokens first, in a fixed order, so their ids are the same for every vocabulary size
    special_list = [
        specials[k]
        for k in (
            ("pad", "unk", "cls", "sep", "mask")
            if kind == "wordpiece"
            else ("cls", "pad", "sep", "unk", "mask")
        )
    ]
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=specials["unk"]))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=special_list,
            continuing_subword_prefix="##",
            show_progress=False,
        )
    elif kind == "bpe":
        tok = Tokenizer(models.BPE())  # byte-level: every byte is in the vocabulary, so nothing is unknown
        if lowercase:
            tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=special_list,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        tok = Tokenizer(models.Unigram())
        steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
        tok.normalizer = normalizers.Sequence(steps)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size,
            special_tokens=special_list,
            unk_token=specials["unk"],
            max_piece_length=16,
            show_progress=False,
        )
    return tok, trainer


def wrap_for_transformers(tok, kind: str, model_max_length: int):
    """Add the post-processor and wrap as the `transformers` fast tokenizer of the model type."""
    from tokenizers import Tokenizer, processors
    from transformers import BertTokenizerFast, PreTrainedTokenizerFast, RobertaTokenizerFast

    specials = specials_for(kind)
    cls, sep = specials["cls"], specials["sep"]
    cls_id, sep_id = tok.token_to_id(cls), tok.token_to_id(sep)
    if kind == "bpe":
        tok.post_processor = processors.RobertaProcessing(
            (sep, sep_id), (cls, cls_id), add_prefix_space=False
        )
    else:
        pair = f"{cls} $A {sep} $B:1 {sep}:1" if kind == "wordpiece" else f"{cls} $A {sep} {sep} $B:1 {sep}:1"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=pair, special_tokens=[(cls, cls_id), (sep, sep_id)]
        )
    if kind != "wordpiece":
        # <mask> swallows the space before it, as RoBERTa's does: "a <mask>" then reads like "a Ġword"
        spec = json.loads(tok.to_str())
        for added in spec["added_tokens"]:
            added["lstrip"] = added["content"] == specials["mask"]
        tok = Tokenizer.from_str(json.dumps(spec))
    wrapper = {"wordpiece": BertTokenizerFast, "bpe": RobertaTokenizerFast}.get(kind, PreTrainedTokenizerFast)
    extra = {"bos_token": cls, "eos_token": sep} if kind != "wordpiece" else {}
    return wrapper(
        tokenizer_object=tok,
        model_max_length=model_max_length,
        unk_token=specials["unk"],
        cls_token=cls,
        sep_token=sep,
        pad_token=specials["pad"],
        mask_token=specials["mask"],
        **extra,
    )


def train_tokenizer(
    documents: Iterable[str],
    out_dir: str | Path,
    kind: str = "wordpiece",
    vocab_size: int = 30522,
    lowercase: bool = True,
    min_frequency: int = 2,
    max_chars: int | None = 1_000_000_000,
    model_max_length: int = 512,
    validation: Iterable[str] | None = None,
    progress: bool = True,
) -> TokenizerReport:
    """Train a tokenizer on `documents` (e.g. a `TextStream`), save it to `out_dir`, return its report.

    At most `max_chars` characters are read, so memory stays bounded whatever the corpus. Without
    `validation` text, every 100th document is held out of training and measured instead.
    """
    if vocab_size < 100:
        raise InputError(f"vocab_size {vocab_size} is too small (at least 100)")
    out_dir = Path(out_dir).resolve()
    if out_dir.is_dir() and any(out_dir.iterdir()) and not _is_tokenizer_dir(out_dir):
        raise InputError(
            f"{out_dir} holds files and no tokenizer: the new tokenizer replaces the whole directory; "
            "choose another output directory"
        )
    tok, trainer = build_tokenizer_and_trainer(kind, vocab_size, lowercase, min_frequency)
    held_out: list[str] = []
    counts = {"documents": 0, "characters": 0}

    def batches() -> Iterator[list[str]]:
        batch: list[str] = []
        bar = _progress_bar(progress)
        for i, doc in enumerate(documents):
            if validation is None and i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1:
                if len(held_out) < HOLDOUT_MAX:
                    held_out.append(doc)
                continue
            batch.append(doc)
            counts["documents"] += 1
            counts["characters"] += len(doc)
            if len(batch) == 1000:
                bar.update(sum(map(len, batch)))
                yield batch
                batch = []
            if max_chars is not None and counts["characters"] >= max_chars:
                break
        bar.update(sum(map(len, batch)))
        bar.close()
        if batch:
            yield batch

    start = time.perf_counter()
    tok.train_from_iterator(batches(), trainer=trainer)
    seconds = time.perf_counter() - start
    if counts["documents"] == 0:
        raise InputError("the corpus gave no text to train the tokenizer on")

    from mlm_pretrain.checkpoint import atomic_directory

    wrapped = wrap_for_transformers(tok, kind, model_max_length)
    # written aside and renamed into place: a run reading `out_dir` (rebuilt in place) sees the old
    # tokenizer or the new one, never a mixture
    with atomic_directory(out_dir) as partial:
        save_tokenizer(wrapped, partial)
        loaded = load_tokenizer(partial)
        texts = list(validation) if validation is not None else held_out
        unk_rate, fertility, words = measure(loaded, texts)
        report = TokenizerReport(
            kind=kind,
            vocab_size=len(loaded),
            lowercase=lowercase,
            documents_trained=counts["documents"],
            characters_trained=counts["characters"],
            validation_documents=len(texts),
            validation_words=words,
            unk_rate=unk_rate,
            fertility=fertility,
            train_seconds=round(seconds, 2),
            peak_rss_mb=peak_rss_mb(),
        )
        (partial / "tokenizer_report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def save_tokenizer(tokenizer, out_dir: str | Path, model_max_length: int | None = None) -> None:
    """`save_pretrained`, with a tokenizer_config.json that transformers 4.x loads too, and
    `model_max_length` set when given (the positions of the model it goes with).

    transformers 5 saves a tokenizer with no class of its own (our Unigram) as `TokenizersBackend`,
    a class 4.x does not have; `PreTrainedTokenizerFast` is the same tokenizer.json reader in 4.x, and
    the name 5 reads as `TokenizersBackend`. A tokenizer 5 loaded from disk also saves the arguments
    of that load (`is_local`, `local_files_only`), which say nothing about the tokenizer.
    """
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    file = out_dir / TOKENIZER_CONFIG
    config = json.loads(file.read_text())
    for key in LOAD_ARGUMENTS:
        config.pop(key, None)
    if (name := config.get("tokenizer_class")) in V4_TOKENIZER_CLASSES:
        config["tokenizer_class"] = V4_TOKENIZER_CLASSES[name]
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    file.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def measure(tokenizer, texts: list[str]) -> tuple[float, float, int]:
    """(UNK rate, tokens per whitespace word, words) of `tokenizer` on `texts`."""
    if not texts:
        return float("nan"), float("nan"), 0
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    tokens = sum(len(e.ids) for e in encodings)
    unks = sum(e.ids.count(tokenizer.unk_token_id) for e in encodings)
    words = sum(len(t.split()) for t in texts)
    return unks / max(tokens, 1), tokens / max(words, 1), words


def _is_tokenizer_dir(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def load_tokenizer(path: str | Path):
    """`AutoTokenizer.from_pretrained(path)`, checked: a real vocabulary and the special tokens MLM needs.

    (transformers 5 builds a 5-token vocabulary without a word of complaint when handed a tokenizer
    the wrong way; every token is then unknown and the loss is NaN. This check catches it at load.)
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not _is_tokenizer_dir(path):
        raise InputError(
            f"{path}: not a tokenizer directory (no tokenizer.json or tokenizer_config.json); "
            "train one with `mlm-pretrain tokenizer`"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    expected = tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True)
    if len(tokenizer) != expected or len(tokenizer) < 100:
        raise InputError(
            f"{path}: tokenizer loaded with {len(tokenizer)} tokens, tokenizer.json has {expected}"
        )
    missing = [
        name
        for name in ("mask_token", "pad_token", "cls_token", "sep_token")
        if getattr(tokenizer, name) is None
    ]
    if missing:
        raise InputError(f"{path}: tokenizer has no {', '.join(missing)}; MLM pretraining needs them")
    return tokenizer


def word_start_table(tokenizer) -> np.ndarray:
    """For every token id: does this token begin a word? (Special tokens count as words of their own.)

    WordPiece marks continuations (`##ing`), byte-level BPE and Unigram mark beginnings (`Ġthe`,
    `▁the`). Whole-word masking and word-level objectives read word boundaries from this table, so
    blocks need not carry them.
    """
    vocab = tokenizer.get_vocab()
    table = np.zeros(len(tokenizer), dtype=bool)
    model_type = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"]
    for token, index in vocab.items():
        if model_type == "WordPiece":
            table[index] = not token.startswith("##")
        else:
            table[index] = token.startswith(("Ġ", "▁"))
    table[tokenizer.all_special_ids] = True
    return table


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports kB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _progress_bar(enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=None,
        unit="char",
        unit_scale=True,
        desc="reading corpus",
        disable=not enabled,
        leave=False,
    )
