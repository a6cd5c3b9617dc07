"""Documents → fixed-length blocks, the way RoBERTa's FULL-SENTENCES packs them, resumable.

Documents are tokenized on the fly (in batches, by the Rust tokenizer), concatenated with a
separator after each, and cut into blocks `[CLS] content [SEP]` of exactly `seq_len` tokens; a
document that does not fit continues in the next block. No token is dropped: the last block of a
finite stream is padded rather than thrown away (`group_texts` in HF's run_mlm.py drops it).

A block is just its token ids; `collate` turns a batch of blocks into tensors and derives from the
ids what the objectives need: the attention mask, the special-tokens mask (never masked), the
document index of every position (for document-aware attention) and word starts (for whole-word
masking), so the stream and its saved state stay small.

Sharding happens on blocks: every rank builds the same global stream and keeps every `world_size`-th
block, so a global batch holds the same blocks however many processes share it. Tokenizing is about
a thousand times cheaper than a training step, so doing it on every rank costs nothing that shows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from mlm_pretrain.corpus import TextStream

log = logging.getLogger(__name__)


class BlockStream:
    """Blocks of `seq_len` token ids from a `TextStream`, with a seeded shuffle buffer and rank sharding.

    `state_dict()` taken between two blocks, given to `load_state_dict()` of a fresh stream built with
    the same arguments, makes it yield exactly the blocks the first would have yielded next, without
    re-reading the corpus: it holds the text stream's position, the tokens already read but not yet
    packed, the shuffle buffer and its random state.
    """

    FIRST_BATCH_DOCS = 512

    def __init__(
        self,
        documents: TextStream,
        tokenizer,
        seq_len: int,
        *,
        shuffle_buffer: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        docs_per_batch: int = 4096,
        chars_per_batch: int = 1 << 20,
    ):
        if documents.world_size != 1:
            raise ValueError("BlockStream shards blocks itself: give it an unsharded TextStream")
        if seq_len < 8:
            raise ValueError(f"seq_len must be at least 8, got {seq_len}")
        self.documents, self.seq_len = documents, seq_len
        self.shuffle_buffer, self.rank, self.world_size = shuffle_buffer, rank, world_size
        # A batch to tokenize ends at docs_per_batch documents or chars_per_batch characters, whichever comes
        # first (512 State of the Union addresses at once held ~220 MB of encodings). Large batches keep
        # the tokenizer's threads evenly busy on a mixture of many files (1 MB batches ran 1.12-1.16x
        # faster than 512-document ones over 24 files), but a (re)started stream waits for its first
        # batch, so that one holds at most FIRST_BATCH_DOCS documents and each next one twice as many.
        self.docs_per_batch, self.chars_per_batch = docs_per_batch, chars_per_batch
        self.backend = tokenizer.backend_tokenizer
        self.cls_id, self.sep_id, self.pad_id = (
            tokenizer.cls_token_id,
            tokenizer.sep_token_id,
            tokenizer.pad_token_id,
        )
        self._encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        self._rng = np.random.default_rng([seed, 1])
        self._pending = np.empty(0, dtype=np.int32)  # content tokens read but not yet in a block
        self._buffer: list[np.ndarray] = []  # the shuffle buffer
        self._text_state = documents.state_dict()  # the text position matching `_pending`
        self.blocks_made = 0  # global count, all ranks: decides which rank keeps a block
        self.tokens_read = 0  # content tokens (document tokens and separators) that entered the packer
        self.tokens_packed = 0  # content tokens that left it inside a block

    @property
    def content_len(self) -> int:
        return self.seq_len - 2

    def __iter__(self) -> Iterator[np.ndarray]:
        for block in self._shuffled(self._packed()):
            self.blocks_made += 1
            if (self.blocks_made - 1) % self.world_size == self.rank:
                yield block

    def _packed(self) -> Iterator[np.ndarray]:
        docs = iter(self.documents)
        limit = min(self.FIRST_BATCH_DOCS, self.docs_per_batch)
        while True:
            while len(self._pending) >= self.content_len:
                content, self._pending = self._pending[: self.content_len], self._pending[self.content_len :]
                yield self._block(content)
            batch, chars = [], 0
            for doc in docs:
                batch.append(doc)
                chars += len(doc)
                if len(batch) >= limit or chars >= self.chars_per_batch:
                    break
            if not batch:
                break
            self._text_state = self.documents.state_dict()
            ids = []
            for encoding in self._encode(batch, add_special_tokens=False):
                ids.extend(encoding.ids)
                ids.append(self.sep_id)
            self.tokens_read += len(ids)
            self._pending = np.concatenate([self._pending, np.asarray(ids, dtype=np.int32)])
            limit = min(2 * limit, self.docs_per_batch)
        if len(self._pending):  # the end of a finite stream: pad the last block, drop nothing
            content, self._pending = self._pending, self._pending[:0]
            yield self._block(content)

    def _block(self, content: np.ndarray) -> np.ndarray:
        self.tokens_packed += len(content)
        block = np.full(self.seq_len, self.pad_id, dtype=np.int32)
        block[0] = self.cls_id
        block[1 : 1 + len(content)] = content
        block[1 + len(content)] = self.sep_id
        return block

    def _shuffled(self, blocks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        if self.shuffle_buffer <= 1:
            yield from blocks
            return
        for block in blocks:
            if len(self._buffer) < self.shuffle_buffer:
                self._buffer.append(block)
                continue
            index = int(self._rng.integers(self.shuffle_buffer))
            out, self._buffer[index] = self._buffer[index], block
            yield out
        while self._buffer:
            yield self._buffer.pop(int(self._rng.integers(len(self._buffer))))

    def state_dict(self) -> dict:
        return {
            "text": self._text_state,
            "pending": self._pending.copy(),
            "buffer": np.stack(self._buffer) if self._buffer else np.empty((0, self.seq_len), dtype=np.int32),
            "rng": self._rng.bit_generator.state,
            "blocks_made": self.blocks_made,
            "tokens_read": self.tokens_read,
            "tokens_packed": self.tokens_packed,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["seq_len"] != self.seq_len:
            raise ValueError(f"saved stream has seq_len {state['seq_len']}, this one {self.seq_len}")
        self.documents.load_state_dict(state["text"])
        self._text_state = state["text"]
        self._pending = np.asarray(state["pending"], dtype=np.int32)
        self._buffer = list(np.asarray(state["buffer"], dtype=np.int32))
        self._rng.bit_generator.state = state["rng"]
        self.blocks_made = state["blocks_made"]
        self.tokens_read, self.tokens_packed = state["tokens_read"], state["tokens_packed"]


def collate(blocks: list[np.ndarray], tokenizer_info: TokenInfo) -> dict[str, torch.Tensor]:
    """Stack blocks into a batch and derive the masks the objectives read, vectorised over the batch."""
    ids = torch.from_numpy(np.stack(blocks)).long()
    special = torch.isin(ids, tokenizer_info.special_ids)
    # a document ends at each separator inside the content; the block's own [SEP] ends the last one
    document_ids = (
        torch.cumsum((ids == tokenizer_info.sep_id).long(), dim=1) - (ids == tokenizer_info.sep_id).long()
    )
    word_start = tokenizer_info.word_start[ids] | torch.roll(special, 1, dims=1)
    return {
        "input_ids": ids,
        "attention_mask": (ids != tokenizer_info.pad_id).long(),
        "special_tokens_mask": special,
        "document_ids": document_ids,
        "word_start": word_start,
    }


class TokenInfo:
    """What `collate` and the objectives need to know of a tokenizer, as tensors, computed once."""

    def __init__(self, tokenizer):
        from mlm_pretrain.tokenizer import word_start_table

        self.vocab_size = len(tokenizer)
        self.pad_id, self.sep_id, self.cls_id = (
            tokenizer.pad_token_id,
            tokenizer.sep_token_id,
            tokenizer.cls_token_id,
        )
        self.mask_id = tokenizer.mask_token_id
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        normal = torch.ones(self.vocab_size, dtype=torch.bool)
        normal[self.special_ids] = False
        self.normal_ids = normal.nonzero().squeeze(1)  # what a "random token" replacement draws from
        self.word_start = torch.from_numpy(word_start_table(tokenizer))


def summarize_packing(
    corpus: list,
    tokenizer_dir: str,
    seq_len: int,
    *,
    weights: list[float] | None = None,
    text_field: str = "text",
    shuffle_buffer: int = 0,
    seed: int = 0,
    max_blocks: int | None = None,
    progress: bool = True,
) -> str:
    """One pass of the corpus through the packer; a printable summary of what came out."""
    import time

    from tqdm.auto import tqdm

    from mlm_pretrain.corpus import as_sources, describe
    from mlm_pretrain.tokenizer import load_tokenizer, peak_rss_mb

    tokenizer = load_tokenizer(tokenizer_dir)
    documents = TextStream(as_sources(corpus, weights, text_field), seed=seed, epochs=1)
    stream = BlockStream(documents, tokenizer, seq_len, shuffle_buffer=shuffle_buffer, seed=seed)
    start = time.perf_counter()
    blocks = padding = 0
    first = None
    for block in tqdm(stream, unit="block", desc="packing", disable=not progress, total=max_blocks):
        blocks += 1
        padding += int((block == tokenizer.pad_token_id).sum())
        first = block if first is None else first
        if max_blocks is not None and blocks >= max_blocks:
            break
    seconds = time.perf_counter() - start
    if first is None:
        return "no blocks: the corpus is empty"
    sample = tokenizer.decode(first[:48].tolist())
    return "\n".join(
        [
            f"corpus:        {describe(documents.stats)}",
            f"tokenizer:     {tokenizer_dir} ({len(tokenizer)} tokens)",
            f"blocks:        {blocks} x {seq_len} tokens ({padding} padding tokens, in the last block only)",
            f"tokens:        {stream.tokens_read} read, {stream.tokens_packed} packed"
            + ("" if max_blocks else f", {stream.tokens_read - stream.tokens_packed} dropped"),
            f"throughput:    {stream.tokens_read / seconds:,.0f} tokens/s ({seconds:.1f} s), "
            f"peak RSS {peak_rss_mb()} MB",
            f"first block:   {sample} ...",
        ]
    )
