"""Replaced-token detection (ELECTRA, Clark et al. 2020): learn from every position, not only the masked.

A small masked-LM generator fills the masked positions with tokens sampled from its softmax; the
discriminator (the encoder we export) reads the result and tells, at every real token, whether it is
the original or a replacement. A sampled token that happens to be the original counts as original.
No gradient flows through the sampling: the generator learns from its MLM loss, the discriminator from
its binary cross-entropy, and both through the token embeddings they share (the generator's are the
discriminator's, projected to its width when it is narrower, as ELECTRA's embedding projection).

The batches are the masked-LM ones (`batches.py`, the `mlm` group); ELECTRA masked 15% with [MASK]
only (`mlm.mask_token_ratio: 1.0`, `random_token_ratio: 0.0`, as `recipes/cpu-electra.yaml`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from mlm_pretrain.errors import InputError
from mlm_pretrain.objectives.mlm import head_of, save_hf_model
from mlm_pretrain.schema import ElectraRecipe, ModelRecipe

_MASK32 = 0xFFFFFFFF


class SharedEmbedding(torch.nn.Module):
    """The discriminator's token embeddings as the generator sees them: projected to its width when that
    is smaller. `weight` is the table the generator's output layer is tied to."""

    def __init__(self, shared: torch.nn.Embedding, width: int):
        super().__init__()
        self.shared = shared
        self.project = (
            torch.nn.Linear(shared.embedding_dim, width, bias=False)
            if width != shared.embedding_dim
            else None
        )

    @property
    def weight(self) -> torch.Tensor:
        return self.shared.weight if self.project is None else self.project(self.shared.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        vectors = self.shared(input_ids)
        return vectors if self.project is None else self.project(vectors)


class SharedDecoder(torch.nn.Module):
    """The generator's output layer, tied to its `SharedEmbedding` (the table is computed once a call)."""

    def __init__(self, embedding: SharedEmbedding, bias: torch.nn.Parameter | None):
        super().__init__()
        self.embedding, self.bias = embedding, bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.embedding.weight, self.bias)


def generator_recipe(discriminator_config, model: ModelRecipe, electra: ElectraRecipe) -> ModelRecipe:
    """The generator's shape: the discriminator's (its config, so that `model.init_from` counts) with the
    hidden and intermediate sizes scaled by `electra.generator_size`, heads of about the discriminator's
    head size (at least one, of an even size: ModernBERT's rotary embeddings need it),
    `electra.generator_layers` layers; always initialised at random."""
    c = discriminator_config
    hidden = round(c.hidden_size * electra.generator_size)
    heads = max(1, hidden // (c.hidden_size // c.num_attention_heads))
    if hidden % heads or (hidden // heads) % 2:
        raise InputError(
            f"electra.generator_size {electra.generator_size} gives the generator a hidden size of {hidden} "
            f"({c.hidden_size} x {electra.generator_size}), not {heads} heads of an even size: choose a "
            "fraction that does"
        )
    return dataclasses.replace(
        model,
        type=c.model_type,
        hidden_size=hidden,
        num_heads=heads,
        intermediate_size=max(1, round(c.intermediate_size * electra.generator_size)),
        num_layers=electra.generator_layers or c.num_hidden_layers,
        init_from=None,
        init_embeddings=None,
    )


class ReplacedTokenDetection(torch.nn.Module):
    """A generator and a discriminator trained together; `forward` has `SparseMLM`'s contract.

    The training loss is a sum over items, so that dividing it by the global batch's masked-token count
    gives a gradient independent of how the batch is split: the generator's summed cross-entropy at the
    masked positions plus `discriminator_weight` x the discriminator's summed cross-entropy over every
    real token x `mask_rate`. The discriminator's term is summed over about masked / mask_rate tokens, so
    after the division it is close to its mean per token, the loss Clark et al. weight by 50. (A ratio of
    the batch's own counts would be exact but depend on the split.)

    The sampling noise is a hash of the corrupted block and the position in it, not a random generator's
    draws: a block gets the same replacements whichever micro-batch or process holds it and after a
    resume, as its masks do (`batches.py`).

    `compile_head` compiles each model's scoring (the generator's head, loss and sampling over the
    vocabulary at the masked positions, with dynamic shapes; the discriminator's head and loss).
    """

    # methods besides `forward` that run the models: FSDP must gather their weights for them too
    extra_forwards = ("discriminator_scores",)

    def __init__(
        self,
        discriminator: torch.nn.Module,
        generator: torch.nn.Module,
        *,
        discriminator_weight: float,
        mask_rate: float,
        compile_head: bool = False,
    ):
        """`discriminator` and `generator`: Hugging Face masked-LM models of one type; the discriminator's
        encoder is kept (its MLM head is not trained), the generator's token embeddings become the
        discriminator's."""
        super().__init__()
        # registered first, so that the shared table's first name (what a de-duplicated state dict keeps)
        # is the discriminator's
        self.discriminator = discriminator.base_model
        config = self.discriminator.config
        hidden = config.hidden_size
        # ELECTRA's discriminator head: dense, GELU, one logit per token
        self.discriminator_head = torch.nn.Sequential(
            torch.nn.Linear(hidden, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1)
        )
        for layer in self.discriminator_head[::2]:
            torch.nn.init.normal_(layer.weight, std=config.initializer_range)
            torch.nn.init.zeros_(layer.bias)
        embedding = SharedEmbedding(self.discriminator.get_input_embeddings(), generator.config.hidden_size)
        generator.set_input_embeddings(embedding)
        generator.set_output_embeddings(SharedDecoder(embedding, generator.get_output_embeddings().bias))
        self.generator = generator
        self.discriminator_weight, self.mask_rate = discriminator_weight, mask_rate
        head = head_of(generator)

        def generate(hidden: torch.Tensor, labels: torch.Tensor, uniforms: torch.Tensor, count_correct: bool):
            logits = head(hidden).float()
            loss = F.cross_entropy(logits, labels, reduction="sum")
            # inverse-CDF sampling from the softmax: the first token whose cumulative probability reaches u
            cumulative = logits.detach().softmax(-1).cumsum(-1)
            sampled = (cumulative < uniforms[:, None]).sum(-1).clamp(max=logits.shape[-1] - 1)
            return loss, (logits.argmax(-1) == labels).sum() if count_correct else None, sampled

        def discriminate(hidden: torch.Tensor, replaced: torch.Tensor, real: torch.Tensor | None):
            logits = self.discriminator_head(hidden).squeeze(-1).float()
            losses = F.binary_cross_entropy_with_logits(logits, replaced, reduction="none")
            return (losses if real is None else losses * real).sum(), logits

        self._generate = torch.compile(generate, dynamic=True) if compile_head else generate
        self._discriminate = torch.compile(discriminate, dynamic=True) if compile_head else discriminate

    def encoders(self) -> list[torch.nn.Module]:
        """The Hugging Face models inside, for `parallelize`: the discriminator's encoder, the generator."""
        return [self.discriminator, self.generator]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        positions: torch.Tensor,
        labels: torch.Tensor,
        count_correct: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training (`count_correct=False`): (the summed loss of the class docstring, None). Evaluation:
        the generator's summed MLM loss and correct predictions at `positions`, comparable with an mlm
        run's; the discriminator's scores are `discriminator_scores`."""
        loss, correct, sampled = self._generator_pass(
            input_ids, attention_mask, positions, labels, count_correct
        )
        if count_correct:
            return loss, correct
        detection, _, _ = self._discriminator_pass(input_ids, attention_mask, positions, labels, sampled)
        return loss + self.discriminator_weight * self.mask_rate * detection, None

    def discriminator_scores(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        positions: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """(summed binary cross-entropy, correct calls, real tokens, replaced tokens) of the discriminator
        on this micro-batch, as one tensor to sum over batches and processes. For evaluation: it runs
        the generator again."""
        _, _, sampled = self._generator_pass(input_ids, attention_mask, positions, labels, False)
        loss, logits, replaced = self._discriminator_pass(
            input_ids, attention_mask, positions, labels, sampled
        )
        real = torch.ones_like(replaced) if attention_mask is None else attention_mask.float()
        correct = (((logits > 0).float() == replaced).float() * real).sum()
        return torch.stack([loss, correct, real.sum(), replaced.sum()])

    def _generator_pass(self, input_ids, attention_mask, positions, labels, count_correct):
        hidden = self.generator.base_model(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        masked = hidden.flatten(0, 1).index_select(0, positions)
        return self._generate(masked, labels, sampling_uniforms(input_ids, positions), count_correct)

    def _discriminator_pass(self, input_ids, attention_mask, positions, labels, sampled):
        """(summed loss, logits, replaced: 1.0 where the input differs from the original)."""
        corrupted = input_ids.flatten().index_copy(0, positions, sampled).view_as(input_ids)
        replaced = torch.zeros(input_ids.numel(), device=input_ids.device)
        replaced = replaced.index_copy(0, positions, (sampled != labels).float()).view_as(input_ids)
        hidden = self.discriminator(input_ids=corrupted, attention_mask=attention_mask).last_hidden_state
        real = None if attention_mask is None else attention_mask.float()
        loss, logits = self._discriminate(hidden, replaced, real)
        return loss, logits, replaced

    def export(self, directory: Path, state: dict[str, torch.Tensor], tokenizer) -> None:
        """The discriminator's encoder as a standard Hugging Face model in `directory` (`AutoModel`,
        `AutoModelForSequenceClassification`), the generator as a standard masked-LM model in
        `directory/generator` (fill-mask), each with the tokenizer. `state`: this module's whole state
        dict, keys prefixed ("discriminator.", "generator."), a tied tensor under its first name only."""
        directory = Path(directory)
        discriminator = {
            k.removeprefix("discriminator."): v for k, v in state.items() if k.startswith("discriminator.")
        }
        save_hf_model(self.discriminator, directory, discriminator, tokenizer)
        save_hf_model(self._standard_generator(state), directory / "generator", None, tokenizer)

    def _standard_generator(self, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        """The generator as its plain Hugging Face class, its token embeddings (and tied output layer) the
        shared table as the generator saw it, built from `state` (this module's weights may be shards)."""
        first_name = {}
        for name, param in self.named_parameters(remove_duplicate=False):
            if name in state:
                first_name.setdefault(id(param), name)
        embedding = self.generator.get_input_embeddings()
        table = state[first_name[id(embedding.shared.weight)]]
        if embedding.project is not None:
            table = table @ state[first_name[id(embedding.project.weight)]].T
        standard = type(self.generator)(self.generator.config)
        tied = {id(standard.get_input_embeddings().weight), id(standard.get_output_embeddings().weight)}
        with torch.no_grad():
            for name, param in standard.named_parameters():
                own = (
                    table if id(param) in tied else state[first_name[id(self.generator.get_parameter(name))]]
                )
                param.copy_(own)
        return standard


def sampling_uniforms(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A number in (0, 1) for each of `positions` (flat indices into the (block x position) grid of
    `input_ids`), a hash of its block's tokens and its position in the block: the same wherever the
    block is. Integer arithmetic in int64 that never overflows, the same on every device."""
    length = input_ids.shape[1]
    column = torch.arange(length, device=input_ids.device)
    tokens = _mix32((input_ids.long() * length + column) & _MASK32)
    blocks = _mix32(tokens.sum(1) & _MASK32)
    row, column = positions // length, positions % length
    hashed = _mix32(blocks[row] ^ _mix32((column + 0x9E3779B9) & _MASK32))
    return ((hashed.double() + 0.5) / 2**32).float()


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Mueller's `hash32`) of values in [0, 2^32): products stay below 2^59."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x
