"""Tokenize a split once, then batch it with dynamic padding and length grouping.

Padding every example to `max_length` (as `run_glue.py` does) spends most of the compute on pad
tokens when texts are short. Here each batch is padded to its own longest example, and training
batches are drawn from length-sorted pools so neighbours have similar lengths; the pools are random
and the batch order is shuffled, so the gradient noise stays that of random batches.
"""

from __future__ import annotations

import random

import torch

from mlm_pretrain.finetune.tasks import Split

POOL_BATCHES = 50  # a pool of 50 batches is sorted by length, then cut into batches


def encode(tokenizer, split: Split, max_length: int) -> list[dict[str, list[int]]]:
    """One dict of token lists (input_ids, attention_mask, token_type_ids if the model uses them) a row."""
    encoded = tokenizer(split.texts, split.pair_texts, truncation=True, max_length=max_length)
    keys = list(encoded.keys())
    return [{key: encoded[key][i] for key in keys} for i in range(len(split))]


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Index batches of similar-length examples, in random order (a fresh draw each call)."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool_size = batch_size * POOL_BATCHES
    batches = []
    for start in range(0, len(order), pool_size):
        pool = sorted(order[start : start + pool_size], key=lengths.__getitem__, reverse=True)
        batches += [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
    rng.shuffle(batches)
    return batches


def sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Index batches for evaluation: all sorted by length, so padding is minimal."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example of the batch: input_ids with the pad token, the other fields with 0."""
    width = max(len(example["input_ids"]) for example in examples)
    batch = {}
    for key in examples[0]:
        pad = pad_token_id if key == "input_ids" else 0
        batch[key] = torch.tensor([ex[key] + [pad] * (width - len(ex[key])) for ex in examples])
    return batch


def padding_fraction(batches: list[list[int]], lengths: list[int]) -> float:
    """Share of the token slots of `batches` (each padded to its longest example) that are padding."""
    slots = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return 1.0 - sum(lengths[i] for batch in batches for i in batch) / slots
