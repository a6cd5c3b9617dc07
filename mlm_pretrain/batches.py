"""Masked-LM batches ready for the model, on the device it runs on: the loop's one source of data.

`MLMBatches` turns a rank's `BlockStream` into training steps. Each step is the rank's share of the
global batch, masked and cut into micro-batches, with the positions to predict as flat indices and
their labels. Masks are drawn on the CPU from a generator seeded by (seed, step) for the whole global
batch, so they are the same on every device, process count and resume; only the finished tensors go
to the device (pinned memory and asynchronous copies on CUDA). Indices rather than a boolean mask
let the model gather the masked positions without a device-to-host sync (boolean indexing needs the
count on the host) and run on the `meta` device, where tests check that nothing is left behind on
the CPU. For the same reason a micro-batch without padding (every training block) carries no attention
mask: transformers checks a mask for padding with a host sync on every forward pass.

It is stateful (torchtitan's data-loader contract): `state_dict()` after a step resumes at the next
one exactly.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mlm_pretrain.objectives.mlm import mask_batch
from mlm_pretrain.packing import BlockStream, TokenInfo, collate
from mlm_pretrain.schema import MaskingRecipe, micro_batches

STEP_SEED = 1_000_003  # masks of step s come from seed * STEP_SEED + s


@dataclass
class MicroBatch:
    """One forward pass: corrupted ids, attention mask (None: no padding), flat indices of the masked
    positions and the original tokens there."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    positions: torch.Tensor
    labels: torch.Tensor


@dataclass
class Step:
    """A rank's share of one optimizer step; `masked` counts the rank's masked tokens (the loop sums
    it over ranks to normalise the loss by the global batch's count)."""

    micro_batches: list[MicroBatch]
    masked: torch.Tensor

    def to(self, device: torch.device) -> Step:
        micro_batches = [MicroBatch(**to_device(vars(m), device)) for m in self.micro_batches]
        return Step(micro_batches, to_device({"masked": self.masked}, device)["masked"])


def to_device(batch: dict[str, torch.Tensor | None], device: torch.device) -> dict[str, torch.Tensor | None]:
    """Copy a batch to `device`: without blocking on CUDA (from pinned memory, which `MLMBatches`
    prepares), so the copy overlaps the step still running."""
    return {k: v if v is None else v.to(device, non_blocking=device.type == "cuda") for k, v in batch.items()}


def pinned(batch: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    return {k: v if v is None else v.pin_memory() for k, v in batch.items()}


def masked_micro_batch(
    ids: torch.Tensor, attention_mask: torch.Tensor, corrupted: torch.Tensor, predict: torch.Tensor
) -> dict[str, torch.Tensor | None]:
    return {
        "input_ids": corrupted,
        "attention_mask": attention_mask if not attention_mask.all() else None,
        "positions": predict.flatten().nonzero().squeeze(1),
        "labels": ids[predict],
    }


class MLMBatches:
    """Steps of masked micro-batches for rank `rank` of `world_size`, on `device`."""

    def __init__(
        self,
        stream: BlockStream,
        info: TokenInfo,
        masking: MaskingRecipe,
        *,
        seed: int,
        micro_batch_size: int,
        accumulation: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.stream, self.info, self.masking, self.seed = stream, info, masking, seed
        self.micro, self.accumulation = micro_batch_size, accumulation
        self.device, self.rank, self.world_size = torch.device(device), rank, world_size
        self.step = 0  # the step the next batch belongs to
        self._blocks = iter(stream)
        # the rank's k-th block of a step is block k * world + rank of the global batch
        self._rows = torch.arange(micro_batch_size * accumulation) * world_size + rank

    def __iter__(self) -> Iterator[Step]:
        return self

    def __next__(self) -> Step:
        return self.make_step().to(self.device)

    def make_step(self) -> Step:
        """The next step in host memory (pinned when the device is a GPU): the part a background
        producer can do."""
        prepare = pinned if self.device.type == "cuda" else dict
        blocks = [next(self._blocks) for _ in range(self.micro * self.accumulation)]
        batch = collate(blocks, self.info)
        generator = torch.Generator().manual_seed(self.seed * STEP_SEED + self.step)
        corrupted, predict = mask_batch(
            batch, self.info, self.masking, generator, self._rows, len(self._rows) * self.world_size
        )
        micro_batches = []
        for i in range(self.accumulation):
            part = slice(i * self.micro, (i + 1) * self.micro)
            parts = masked_micro_batch(
                batch["input_ids"][part], batch["attention_mask"][part], corrupted[part], predict[part]
            )
            micro_batches.append(MicroBatch(**prepare(parts)))
        self.step += 1
        return Step(micro_batches, prepare({"masked": predict.sum().float()})["masked"])

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.step = state["step"]
        self._blocks = iter(self.stream)


def training_batches(recipe, tokenizer, info: TokenInfo, *, device, rank: int, world_size: int) -> MLMBatches:
    """The training steps a pretraining recipe (`schema.PretrainRecipe`) describes, for one rank: its
    corpus streamed for as many epochs as the run takes, packed, shuffled, masked, in micro-batches of at
    most `optim.micro_batch_size` blocks (`schema.micro_batches`)."""
    from mlm_pretrain.corpus import TextStream

    data, optim = recipe.data, recipe.optim
    documents = TextStream(data.corpus, text_field=data.text_field, seed=recipe.seed, epochs=None)
    stream = BlockStream(
        documents,
        tokenizer,
        data.seq_len,
        shuffle_buffer=data.shuffle_buffer,
        seed=recipe.seed,
        rank=rank,
        world_size=world_size,
    )
    micro, accumulation = micro_batches(optim.batch_size, optim.micro_batch_size, world_size)
    return MLMBatches(
        stream,
        info,
        recipe.mlm,
        seed=recipe.seed,
        micro_batch_size=micro,
        accumulation=accumulation,
        device=device,
        rank=rank,
        world_size=world_size,
    )


EVAL_SEED = 20_240_601  # evaluation masks are the same at every evaluation of every run


def evaluation_batches(
    stream: BlockStream,
    info: TokenInfo,
    masking: MaskingRecipe,
    *,
    micro_batch_size: int,
    max_blocks: int,
    device: torch.device,
) -> list[MicroBatch]:
    """The first `max_blocks` held-out blocks in micro-batches, each block masked at `eval_mask_rate` by
    a generator seeded with its index: the same masks at every call, whatever the micro-batch size or
    the number of processes (every process makes them all; `trainer.evaluate` shares them out)."""
    blocks = list(itertools.islice(stream, max_blocks))
    out = []
    for start in range(0, len(blocks), micro_batch_size):
        batch = collate(blocks[start : start + micro_batch_size], info)
        rows = [
            mask_batch(
                {key: value[i : i + 1] for key, value in batch.items()},
                info,
                masking,
                torch.Generator().manual_seed(EVAL_SEED + start + i),
                evaluating=True,
            )
            for i in range(len(batch["input_ids"]))
        ]
        corrupted, predict = (torch.cat(part) for part in zip(*rows, strict=True))
        parts = masked_micro_batch(batch["input_ids"], batch["attention_mask"], corrupted, predict)
        out.append(MicroBatch(**to_device(parts, torch.device(device))))
    return out


class Prefetched:
    """`MLMBatches` made ahead by a background thread into a bounded queue, so that tokenizing, packing
    and masking overlap the training step (the tokenizer and torch's kernels release the GIL).

    Its `state_dict()` is the position after the last step the loop *consumed*, not the last one the
    thread produced: each step travels with the state its source had right after making it, so a
    checkpoint resumes exactly where the model stopped. An error in the thread is raised in the loop,
    with the thread's traceback (file and line) attached; `close()` stops the thread without waiting on
    a full queue."""

    def __init__(self, source: MLMBatches, depth: int):
        import queue
        import threading

        self.source = source
        self._state = copy.deepcopy(source.state_dict())
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="batch-producer", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        import queue

        while not self._stop.is_set():
            try:
                item = (self.source.make_step(), copy.deepcopy(self.source.state_dict()))
            except BaseException as err:  # handed to the loop, which raises it
                item = err
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def __iter__(self) -> Iterator[Step]:
        return self

    def __next__(self) -> Step:
        import queue

        while True:  # poll, so that Ctrl-C reaches the loop while it waits
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                continue
        if isinstance(item, BaseException):
            raise item
        step, self._state = item
        return step.to(self.source.device)

    def state_dict(self) -> dict:
        return self._state

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@contextmanager
def prefetched(source: MLMBatches, depth: int) -> Iterator[MLMBatches | Prefetched]:
    """`source` made `depth` steps ahead in the background (inline for 0), stopped on leaving."""
    if depth <= 0:
        yield source
        return
    producer = Prefetched(source, depth)
    try:
        yield producer
    finally:
        producer.close()
