"""Shared fixtures: a tiny, real Hugging Face checkpoint built from a few KB of Austen."""

from __future__ import annotations

import os
from pathlib import Path

# tests run offline, as they must on a machine with no route to the Hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

DATA = Path(__file__).parent / "data"
SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}


def build_tiny_checkpoint(out: Path, vocab_size: int = 300) -> Path:
    """A WordPiece tokenizer trained on tests/data/austen_8k.txt and a 2-layer, 32-wide BertForMaskedLM,
    both saved with save_pretrained (weights as model.safetensors) into `out`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    lines = (DATA / "austen_8k.txt").read_text(encoding="utf-8").splitlines()
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        lines, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()))
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    tokenizer.save_pretrained(out)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=tok.token_to_id("[PAD]"),
    )
    BertForMaskedLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A session-wide tiny checkpoint directory: copy it before changing it."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"))
