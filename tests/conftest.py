"""Shared fixtures: a tiny, real Hugging Face checkpoint built from a few KB of Austen."""

from __future__ import annotations

import os
from pathlib import Path

# tests run offline, as they must on a machine with no route to the Hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

DATA = Path(__file__).parent / "data"


def build_tiny_checkpoint(out: Path, texts: list[str] | None = None, vocab_size: int = 300) -> Path:
    """A WordPiece tokenizer trained on `texts` (default: tests/data/austen_8k.txt) and a 2-layer, 32-wide
    BertForMaskedLM, both saved with save_pretrained (weights as model.safetensors) into `out`."""
    from mlm_pretrain.models import build_model
    from mlm_pretrain.schema import ModelRecipe
    from mlm_pretrain.tokenizer import load_tokenizer, train_tokenizer

    texts = texts or (DATA / "austen_8k.txt").read_text(encoding="utf-8").splitlines()
    train_tokenizer(texts, out, vocab_size=vocab_size, min_frequency=1, progress=False, model_max_length=128)
    tokenizer = load_tokenizer(out)
    model = build_model(
        ModelRecipe(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tokenizer, 128
    )
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A session-wide tiny checkpoint directory: copy it before changing it."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run ~20x faster on one thread when other processes share the 2 cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_process_group(monkeypatch):
    """A gloo process group of this process alone (FSDP2 needs one), destroyed after the test."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "WORLD_SIZE": "1",
    }.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo")
    yield
    dist.destroy_process_group()
