"""The pretraining recipe: every key, its type, its valid range and which objective it applies to.

This module is the only place the recipe's rules live. Allowed words are `Literal` types; numeric ranges
are declared on the field with `bounded` (interval notation, e.g. "[1, inf)"); a group of keys that
belongs to some objectives only says which with `group`; the rules that tie keys together are a group's
`problems()`, (key, what is wrong) for each one broken. `mlm_pretrain.recipe` enforces all of them when
it loads a recipe, naming the key, where it was set (the file or the command-line override) and the valid
range. Constructing these classes directly checks nothing: code that does so is trusted, a user's recipe
goes through the loader.

Stdlib only: `mlm-pretrain pretrain --help` and the loader must not wait for torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from mlm_pretrain.errors import InputError

Objective = Literal["mlm", "electra", "skipgram", "cbow"]
ModelType = Literal["bert", "roberta", "modernbert"]
Masking = Literal["token", "whole_word", "span"]
Schedule = Literal["linear", "cosine", "wsd", "constant"]
OnNonfinite = Literal["stop", "skip"]
Precision = Literal["no", "bf16", "auto"]
Parallel = Literal["ddp", "fsdp"]
Word2VecObjective = Literal["skipgram", "cbow"]
Word2VecTokens = Literal["words", "tokenizer"]
# accelerate's tracker names (its LOGGER_TYPE_TO_CLASS; tests/test_recipe.py checks that the two agree)
Tracker = Literal[
    "aim", "comet_ml", "mlflow", "tensorboard", "wandb", "clearml", "dvclive", "swanlab", "trackio"
]


@dataclass(frozen=True)
class Range:
    """A numeric interval, as written in interval notation: "[1, inf)", "(0, 1)"."""

    low: float
    high: float
    low_open: bool
    high_open: bool

    @classmethod
    def parse(cls, text: str) -> Range:
        low, high = (float(part) for part in text[1:-1].split(","))
        return cls(low, high, text[0] == "(", text[-1] == ")")

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        def number(x: float) -> str:
            return str(int(x)) if x.is_integer() else str(x)

        if math.isinf(self.high):
            return f"{'above' if self.low_open else 'at least'} {number(self.low)}"
        brackets = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {brackets[0]}{number(self.low)}, {number(self.high)}{brackets[1]}"


def bounded(interval: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A field whose number (or each number of a list; None is always allowed for an optional key) lies
    in `interval`."""
    return field(default=default, metadata={"range": Range.parse(interval)}, **kwargs)


def group(schema: type, *objectives: str) -> Any:
    """A group of keys that applies to `objectives` only: a recipe that sets it for another is refused."""
    return field(default_factory=schema, metadata={"objectives": objectives})


@dataclass
class DataRecipe:
    corpus: list[str | dict] = field(default_factory=lambda: ["@sample"])
    text_field: str = "text"
    validation: list[str] = field(default_factory=lambda: ["@sample-validation"])
    tokenizer: str = "tokenizers/default-wordpiece-8k"
    seq_len: int = bounded("[8, inf)", 128)
    shuffle_buffer: int = bounded("[0, inf)", 1000)  # blocks


@dataclass
class ModelRecipe:
    type: ModelType = "bert"
    hidden_size: int = bounded("[1, inf)", 256)
    num_layers: int = bounded("[1, inf)", 4)
    num_heads: int = bounded("[1, inf)", 4)
    intermediate_size: int = bounded("[1, inf)", 1024)
    dropout: float = bounded("[0, 1)", 0.0)  # none for short single-epoch pretraining (Cramming, ModernBERT)
    # default: the tokenizer's; any other value is an error
    vocab_size: int | None = bounded("[1, inf)", None)
    max_position_embeddings: int | None = bounded("[1, inf)", None)  # default: the sequence length
    init_from: str | None = None  # an HF masked-LM directory to continue from instead of random weights
    # a word2vec run's final/ directory, trained with `word2vec.tokens: tokenizer` over the same tokenizer:
    # its vectors initialise the input embeddings (projected if their size differs)
    init_embeddings: str | None = None

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.hidden_size % self.num_heads:
            yield "num_heads", f"must divide model.hidden_size {self.hidden_size}, got {self.num_heads}"


@dataclass
class MaskingRecipe:
    """The `mlm` group of a recipe."""

    mask_rate: float = bounded("(0, 1)", 0.15)
    eval_mask_rate: float = bounded("(0, 1)", 0.15)  # evaluation masks at BERT's rate, whatever training uses
    mask_token_ratio: float = bounded("[0, 1]", 0.8)  # of the chosen positions: replaced by [MASK]
    random_token_ratio: float = bounded("[0, 1]", 0.1)  # replaced by a random token; the rest keep theirs
    masking: Masking = "token"
    span_p: float = bounded("(0, 1]", 0.2)  # span lengths are geometric(span_p), clipped at span_max
    span_max: int = bounded("[1, inf)", 10)

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.mask_token_ratio + self.random_token_ratio > 1:
            yield (
                "random_token_ratio",
                f"must be at most 1 - mlm.mask_token_ratio ({1 - self.mask_token_ratio:g}), "
                f"got {self.random_token_ratio}",
            )


@dataclass
class OptimRecipe:
    """The `optim` group of a recipe."""

    lr: float = bounded("(0, inf)", 1e-3)
    weight_decay: float = bounded("[0, inf)", 0.01)
    betas: list[float] = bounded("[0, 1)", default_factory=lambda: [0.9, 0.98])
    eps: float = bounded("[0, inf)", 1e-6)
    schedule: Schedule = "linear"
    warmup: float = bounded("[0, 1]", 0.06)  # fraction of the run
    decay: float = bounded("[0, 1]", 0.2)  # wsd only: the fraction of the run spent decaying
    clip: float = bounded("[0, inf)", 1.0)  # max gradient norm; 0 turns clipping off
    batch_size: int = bounded("[1, inf)", 64)  # global batch in blocks, over processes and accumulation
    # the most blocks per process per forward pass: the largest size up to it that divides the share of
    # each process is used, and the rest accumulated (`micro_batches`)
    micro_batch_size: int = bounded("[1, inf)", 32)
    # a step whose loss or gradient norm is not finite is never applied; then `stop` ends the run with an
    # error, `skip` goes on and stops after more than `max_skips_in_a_row` such steps in a row
    on_nonfinite: OnNonfinite = "stop"
    max_skips_in_a_row: int = bounded("[0, inf)", 10)

    def problems(self) -> Iterator[tuple[str, str]]:
        if len(self.betas) != 2:
            yield "betas", f"needs two values, got {self.betas}"


@dataclass
class ElectraRecipe:
    """The `electra` group of a recipe (objective electra: replaced-token detection, Clark et al. 2020)."""

    # the generator's hidden and intermediate sizes as a fraction of the discriminator's (its heads keep
    # the discriminator's head size); Clark et al. found 1/4 to 1/2 best, 1/4 for ELECTRA-Small
    generator_size: float = bounded("(0, 1]", 0.25)
    generator_layers: int | None = bounded("[1, inf)", None)  # default: the discriminator's
    discriminator_weight: float = bounded("(0, inf)", 50.0)  # of the detection loss against the generator's


# gensim's defaults: CBOW averages its context, so it takes a larger step.
DEFAULT_ALPHA = {"skipgram": 0.025, "cbow": 0.05}


@dataclass
class Word2VecRecipe:
    """The `word2vec` group of a recipe (objective skipgram | cbow)."""

    objective: Word2VecObjective = "skipgram"
    vector_size: int = bounded("[1, inf)", 100)
    window: int = bounded("[1, inf)", 5)  # the largest window; each center draws its own from 1..window
    negative: int = bounded("[1, inf)", 5)  # noise words per center (per pair without shared_negatives)
    shared_negatives: bool = True  # skip-gram: one draw of noise words for all context words of a center
    min_count: int = bounded("[1, inf)", 5)  # rarer words are dropped from the vocabulary (and the text)
    max_vocab: int = bounded("[0, inf)", 0)  # keep only the most frequent words; 0 keeps all
    sample: float = bounded("[0, inf)", 1e-3)  # subsampling threshold; 0 disables subsampling
    alpha: float = bounded("[0, inf)", 0.0)  # initial learning rate; 0: the objective's DEFAULT_ALPHA
    min_alpha: float = bounded("[0, inf)", 1e-4)
    epochs: int = bounded("[1, inf)", 5)
    # Centers per update. The updates of a batch are summed, so a frequent word's row takes hundreds of
    # steps at once; around 2048 (and 1024 with 2 workers, whose batches overlap) training diverges.
    batch_size: int = bounded("[1, inf)", 256)
    chunk_words: int = bounded("[1, inf)", 100_000)  # raw words read, subsampled and windowed at a time
    seed: int = 1
    tokens: Word2VecTokens = "words"
    tokenizer: str = ""  # a Hugging Face tokenizer dir or name, when tokens == "tokenizer"
    lowercase: bool = True  # words only
    strip_punctuation: bool = True  # words only

    @property
    def start_alpha(self) -> float:
        return self.alpha or DEFAULT_ALPHA[self.objective]


@dataclass
class ImplRecipe:
    """Settings that change how a run goes, never what it learns (Cramming's `impl`)."""

    out: str = "runs/pretrain"
    # "bf16" runs autocast in bfloat16, on CPU too; "auto": bf16 where the hardware has it, else fp32
    mixed_precision: Precision = "no"
    compile: bool = False  # torch.compile each encoder layer and the MLM head (worth it with bf16)
    parallel: Parallel = "ddp"  # how the model is spread over processes (see parallel.py)
    activation_checkpointing: bool = False  # recompute each encoder layer in backward: less memory
    prefetch: int = bounded("[0, inf)", 2)  # steps of batches made ahead by a thread (0: inline)
    threads: int | None = bounded("[1, inf)", None)  # torch threads per process; default: cores / processes
    resume: bool = False  # continue from the newest checkpoint in `out`
    eval_every: int = bounded("[1, inf)", 200)
    eval_blocks: int = bounded("[1, inf)", 256)  # validation blocks per evaluation
    save_every: int = bounded("[1, inf)", 200)
    keep_last: int = bounded("[0, inf)", 2)  # 0 keeps every checkpoint
    log_every: int = bounded("[1, inf)", 10)
    # experiment trackers, as accelerate names them ([]: metrics.jsonl only)
    log_with: list[Tracker] = field(default_factory=lambda: ["tensorboard"])
    progress: bool = True
    push_to_hub: str | None = None  # a repo id: push the exported model every `push_every` checkpoints
    push_every: int = bounded("[0, inf)", 0)
    push_private: bool = False  # create the push_to_hub repo private (an existing repo keeps its visibility)


@dataclass
class PretrainRecipe:
    seed: int = 0
    objective: Objective = "mlm"
    # stop rules (the first reached stops; the schedule follows the furthest along). An mlm run needs at
    # least one; a word2vec run also stops after its `word2vec.epochs`.
    max_steps: int | None = bounded("[1, inf)", None)
    max_tokens: int | None = bounded("[1, inf)", None)
    max_minutes: float | None = bounded("(0, inf)", None)
    data: DataRecipe = field(default_factory=DataRecipe)
    model: ModelRecipe = group(ModelRecipe, "mlm", "electra")  # electra: the discriminator's
    mlm: MaskingRecipe = group(MaskingRecipe, "mlm", "electra")
    optim: OptimRecipe = group(OptimRecipe, "mlm", "electra")
    electra: ElectraRecipe = group(ElectraRecipe, "electra")
    # word2vec.objective follows the top-level objective, word2vec.tokenizer defaults to data.tokenizer,
    # word2vec.seed to seed
    word2vec: Word2VecRecipe = group(Word2VecRecipe, "skipgram", "cbow")
    impl: ImplRecipe = field(default_factory=ImplRecipe)

    def problems(self) -> Iterator[tuple[str, str]]:
        stops = self.max_steps or self.max_tokens or self.max_minutes
        if self.objective in ("mlm", "electra") and not stops:
            yield (
                "max_steps",
                f"is not set, nor max_tokens nor max_minutes: an {self.objective} run needs one",
            )

    def to_dict(self) -> dict:
        """The recipe as a mapping, less the groups that do not apply to its objective: what a run
        records (`recipe.yaml`), and what the loader takes back."""
        return applicable(dataclasses.asdict(self))

    def plan(self) -> dict:
        return self.plan_of(self.to_dict())

    @staticmethod
    def plan_of(recipe: dict) -> dict:
        """Everything in a recipe that decides what the run learns: all but `impl`, the groups of other
        objectives (a run recorded before a group was added still matches) and the micro-batch size,
        which only splits the global batch (so a run may resume on another number of processes)."""
        plan = {k: v for k, v in applicable(recipe).items() if k != "impl"}
        plan["optim"] = {k: v for k, v in plan.get("optim", {}).items() if k != "micro_batch_size"}
        return plan


def applicable(recipe: dict) -> dict:
    """`recipe` (a mapping of a `PretrainRecipe`) without the groups that do not apply to its objective."""
    objective = recipe.get("objective", "mlm")
    other = {
        f.name
        for f in dataclasses.fields(PretrainRecipe)
        if "objectives" in f.metadata and objective not in f.metadata["objectives"]
    }
    return {key: value for key, value in recipe.items() if key not in other}


def micro_batches(batch_size: int, cap: int, processes: int) -> tuple[int, int]:
    """(micro-batch size, accumulation steps) for each of `processes` to make its share of a global batch
    of `batch_size` blocks: the largest micro-batch up to `cap` that divides the share."""
    if batch_size % processes:
        raise InputError(
            f"optim.batch_size {batch_size} does not divide by the {processes} processes of this run; "
            f"use a multiple of {processes}"
        )
    share = batch_size // processes
    micro = max(size for size in range(1, min(cap, share) + 1) if share % size == 0)
    return micro, share // micro
