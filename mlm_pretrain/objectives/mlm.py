"""Masked-token modelling: choose positions to mask, corrupt them, and score the model on them only.

Masking is vectorised over the whole batch. It draws its random numbers from a generator the caller
seeds per step for the *global* batch and keeps only the rows of its own blocks, so a block is masked
the same way whichever rank holds it and however often the run is stopped and resumed, and a fresh
step draws fresh masks (dynamic masking).

Every block with a token that may be masked gets at least one masked position, so no step or
evaluation batch scores 0/0. Three ways to choose what to mask, all on top of "never a special or
padding token":
- `token`: each token independently with probability `mask_rate` (BERT, RoBERTa);
- `whole_word`: each word independently, all its pieces together (WordPiece `##`, `Ġ` and `▁` marks);
- `span`: runs of whole words with geometric lengths (SpanBERT: p=0.2, at most 10 words), started
  at a rate that masks about `mask_rate` of the words.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from mlm_pretrain.packing import TokenInfo
from mlm_pretrain.schema import MaskingRecipe


def mask_batch(
    batch: dict[str, torch.Tensor],
    info: TokenInfo,
    config: MaskingRecipe,
    generator: torch.Generator,
    rows: torch.Tensor | None = None,
    global_rows: int | None = None,
    evaluating: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(corrupted input ids, boolean mask of the positions to predict) for a collated batch.

    `rows` are the indices of this batch's blocks within a global batch of `global_rows` blocks; the
    random numbers are drawn for the global batch, so they depend on the block's global index only.
    `evaluating` masks at `eval_mask_rate`.
    """
    ids, special = batch["input_ids"], batch["special_tokens_mask"]
    batch_size, seq_len = ids.shape
    if rows is None:
        rows, global_rows = torch.arange(batch_size), batch_size
    draws = torch.rand(3, global_rows, seq_len, generator=generator)[:, rows]  # choice, corruption, spans
    random_ids = torch.randint(len(info.normal_ids), (global_rows, seq_len), generator=generator)[rows]
    rate = config.eval_mask_rate if evaluating else config.mask_rate

    if config.masking == "token":
        chosen = draws[0] < rate
    else:
        # a word is a unit: index every token by the word it belongs to and choose words
        word_index = torch.cumsum(batch["word_start"].long(), dim=1) - 1
        if config.masking == "whole_word":
            chosen_words = draws[0] < rate
        else:
            chosen_words = _span_words(draws[0], draws[2], rate, config)
        chosen = torch.gather(chosen_words, 1, word_index.clamp(min=0))
    chosen &= ~special
    # A block with nothing chosen (a low rate, a short block) would score 0/0: it gets the one maskable
    # position whose choice draw came closest, with its word; blocks that have a choice keep it as it is.
    empty = ~chosen.any(dim=1) & (~special).any(dim=1)
    if empty.any():
        closest = draws[0].masked_fill(special, 2.0).argmin(dim=1, keepdim=True)
        if config.masking == "token":
            extra = torch.zeros_like(chosen).scatter_(1, closest, True)
        else:
            extra = (word_index == torch.gather(word_index, 1, closest)) & ~special
        chosen |= extra & empty[:, None]

    corrupted = ids.clone()
    to_mask = chosen & (draws[1] < config.mask_token_ratio)
    to_random = (
        chosen
        & (draws[1] >= config.mask_token_ratio)
        & (draws[1] < config.mask_token_ratio + config.random_token_ratio)
    )
    corrupted[to_mask] = info.mask_id
    corrupted[to_random] = info.normal_ids[random_ids[to_random]]
    return corrupted, chosen


def _span_words(
    start_draws: torch.Tensor, length_draws: torch.Tensor, rate: float, config: MaskingRecipe
) -> torch.Tensor:
    """Words covered by spans: each word starts one with probability rate / mean span length."""
    lengths = torch.arange(1, config.span_max + 1, dtype=torch.float)
    probs = config.span_p * (1 - config.span_p) ** (lengths - 1)
    probs /= probs.sum()  # geometric, clipped at span_max
    mean_length = float((lengths * probs).sum())
    starts = start_draws < rate / mean_length
    # inverse-CDF sample of each start's span length from the second draw
    length = (
        torch.searchsorted(torch.cumsum(probs, 0), length_draws.contiguous()).clamp(max=config.span_max - 1)
        + 1
    )
    covered = torch.zeros_like(starts)
    for offset in range(config.span_max):  # a word is covered if a span started `offset` words before it
        reaches = starts & (length > offset)
        covered[:, offset:] |= reaches[:, : reaches.shape[1] - offset]
    return covered


class SparseMLM(torch.nn.Module):
    """An HF masked-LM model scored on the masked positions only (sparse prediction).

    The encoder runs on every position; the MLM head, most of the FLOPs of a small model with a large
    vocabulary, runs on the masked ones only, as in Cramming and MosaicBERT. The loss is a sum, so the
    trainer can divide by the masked-token count of the whole global batch. (It is a module, not a
    function, so that DistributedDataParallel sees the forward pass and syncs gradients.)

    `compile_head` compiles the head with its loss, for a number of masked positions that changes every
    step (dynamic shapes: one graph): it fuses the casts, the softmax and the loss over the vocabulary,
    which eager mode runs as separate passes over a (masked tokens x vocabulary) tensor.
    """

    def __init__(self, model: torch.nn.Module, compile_head: bool = False):
        super().__init__()
        self.model = model
        head = head_of(model)  # fail now, not at the first step, on a model without a known MLM head

        def score(hidden: torch.Tensor, labels: torch.Tensor, count_correct: bool):
            logits = head(hidden)
            loss = F.cross_entropy(logits.float(), labels, reduction="sum")
            return loss, (logits.argmax(-1) == labels).sum() if count_correct else None

        self._score = torch.compile(score, dynamic=True) if compile_head else score

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        labels: torch.Tensor,
        count_correct: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(summed cross-entropy, number of correct predictions) at `positions`, flat indices into the
        (batch x sequence) grid, whose original tokens are `labels`.

        Training, which has no use for the count, skips it (`count_correct=False`: it returns None): in
        eager mode an argmax over the vocabulary at every masked position costs as much as the softmax."""
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self._score(hidden.flatten(0, 1).index_select(0, positions), labels, count_correct)

    def encoders(self) -> list[torch.nn.Module]:
        """The Hugging Face models inside, for `parallelize`."""
        return [self.model]

    def export(self, directory: Path, state: dict[str, torch.Tensor], tokenizer) -> None:
        """The masked-LM model as a Hugging Face directory (`AutoModelForMaskedLM`,
        `AutoModelForSequenceClassification`, fill-mask), from `state`, this module's whole state dict
        (keys prefixed "model."; the model's own parameters may be FSDP shards)."""
        own = {k.removeprefix("model."): v for k, v in state.items()}
        save_hf_model(self.model, directory, own, tokenizer)


def save_hf_model(
    model: torch.nn.Module, directory: Path, state: dict[str, torch.Tensor] | None, tokenizer
) -> None:
    """`model`'s config, `state` (default: its own weights) as model.safetensors and the tokenizer, in
    `directory`.

    It loads under transformers 4.x as under 5 (`portable_config`, `save_tokenizer`), and the tokenizer's
    `model_max_length` is the positions the model has, so `truncation=True` (pipelines, `Trainer`) cuts
    long inputs to what the model takes. No BERT pooler is written: masked-token pretraining has none to
    train, so it would be random weights; loading for classification reports the pooler and the
    classifier as new, the head fine-tuning trains."""
    from mlm_pretrain.models import make_config_portable, usable_positions
    from mlm_pretrain.tokenizer import save_tokenizer

    model.save_pretrained(directory, state_dict=state, safe_serialization=True)
    make_config_portable(directory)
    save_tokenizer(tokenizer, directory, model_max_length=usable_positions(model.config))


def head_of(model: torch.nn.Module):
    """The MLM head of an HF masked-LM model, as a function from hidden states to vocabulary logits."""
    if hasattr(model, "cls"):  # BertForMaskedLM
        return model.cls
    if hasattr(model, "lm_head"):  # RobertaForMaskedLM
        return model.lm_head
    if hasattr(model, "head") and hasattr(model, "decoder"):  # ModernBertForMaskedLM
        return lambda hidden: model.decoder(model.head(hidden))
    raise TypeError(f"no known MLM head on {type(model).__name__}")
