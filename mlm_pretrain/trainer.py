"""The pretraining recipe and the training loop, on `accelerate`.

The loop reads top to bottom: build, maybe resume, then per step draw the global batch's blocks,
mask them, accumulate gradients, clip, step, and log, evaluate, checkpoint on their cadence.

What makes runs reproducible and resumable:
- the schedule is a function of progress (steps, tokens or minutes done over those planned), so it
  holds no state and a resumed run recomputes it;
- masks are drawn from a generator seeded by (seed, step) for the global batch, so they depend on
  neither the number of processes nor on where a run was stopped;
- each step's loss is divided by the masked-token count of the whole global batch, so one process
  with a batch of 8 and two with 4 each compute the same gradient;
- a checkpoint holds model, optimizer, RNG states, counters and the data stream position.
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from mlm_pretrain.errors import InputError
from mlm_pretrain.launch import PRECISIONS
from mlm_pretrain.models import ModelRecipe
from mlm_pretrain.objectives.mlm import MaskingConfig
from mlm_pretrain.objectives.word2vec import Word2VecConfig
from mlm_pretrain.optim import OptimRecipe
from mlm_pretrain.parallel import PARALLELS, clip_grad_norm, full_state_dict, no_gradient_sync
from mlm_pretrain.stop import StopRequest

log = logging.getLogger(__name__)


class Diverged(InputError):
    """The loss or the weights stopped being finite: the recipe's learning rate or warmup is at fault."""


OBJECTIVES = ("mlm", "skipgram", "cbow")


@dataclass
class DataRecipe:
    corpus: list[str | dict] = field(default_factory=lambda: ["@sample"])
    text_field: str = "text"
    validation: list[str] = field(default_factory=lambda: ["@sample-validation"])
    tokenizer: str = "tokenizers/default-wordpiece-8k"
    seq_len: int = 128
    shuffle_buffer: int = 1000  # blocks


@dataclass
class ImplRecipe:
    """Settings that change how a run goes, never what it learns (Cramming's `impl`)."""

    out: str = "runs/pretrain"
    # "bf16" runs autocast in bfloat16, on CPU too; "auto": bf16 where the hardware has it, else fp32
    mixed_precision: str = "no"
    compile: bool = False  # torch.compile each encoder layer and the MLM head (worth it with bf16)
    parallel: str = "ddp"  # ddp | fsdp: how the model is spread over processes (see parallel.py)
    activation_checkpointing: bool = False  # recompute each encoder layer in backward: less memory
    prefetch: int = 2  # steps of batches a background thread makes ahead (0: made inline, in the loop)
    threads: int | None = None  # torch threads per process; default: cores / processes
    resume: bool = False  # continue from the newest checkpoint in `out`
    eval_every: int = 200
    eval_blocks: int = 256  # validation blocks per evaluation
    save_every: int = 200
    keep_last: int = 2
    log_every: int = 10
    # experiment trackers, as accelerate names them: tensorboard, mlflow, wandb, trackio, ... ([]: none)
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    progress: bool = True
    push_to_hub: str | None = None  # a repo id: push the exported model every `push_every` checkpoints
    push_every: int = 0

    def __post_init__(self) -> None:
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(
                f"impl.mixed_precision {self.mixed_precision!r} unknown; valid: {', '.join(PRECISIONS)}"
            )
        if self.parallel not in PARALLELS:
            raise ValueError(f"impl.parallel {self.parallel!r} unknown; valid: {', '.join(PARALLELS)}")
        from mlm_pretrain.run_log import check_tracker_names

        check_tracker_names(self.log_with)


@dataclass
class PretrainRecipe:
    seed: int = 0
    objective: str = "mlm"
    # stop rules (the first reached stops; the schedule follows the furthest along)
    max_steps: int | None = 1000
    max_tokens: int | None = None
    max_minutes: float | None = None
    data: DataRecipe = field(default_factory=DataRecipe)
    model: ModelRecipe = field(default_factory=ModelRecipe)
    mlm: MaskingConfig = field(default_factory=MaskingConfig)
    optim: OptimRecipe = field(default_factory=OptimRecipe)
    # objective skipgram | cbow: its settings (word2vec.objective follows the top-level objective,
    # word2vec.tokenizer defaults to data.tokenizer, word2vec.seed to seed)
    word2vec: Word2VecConfig = field(default_factory=Word2VecConfig)
    impl: ImplRecipe = field(default_factory=ImplRecipe)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r} unknown; valid: {', '.join(OBJECTIVES)}")
        if not (self.max_steps or self.max_tokens or self.max_minutes):
            raise ValueError("set at least one stop rule: max_steps, max_tokens or max_minutes")

    def plan(self) -> dict:
        return self.plan_of(asdict(self))

    @staticmethod
    def plan_of(recipe: dict) -> dict:
        """Everything in a recipe that decides what the run learns: all but `impl`, and the micro-batch
        size, which only splits the global batch (so a run may resume on another number of processes)."""
        plan = {k: v for k, v in recipe.items() if k != "impl"}
        plan["optim"] = {k: v for k, v in plan.get("optim", {}).items() if k != "micro_batch_size"}
        return plan


def pretrain(recipe: PretrainRecipe) -> dict:
    """Run (or resume) the recipe; return the final evaluation metrics. Every process calls this."""
    if recipe.objective != "mlm":
        from mlm_pretrain.word2vec_trainer import pretrain_word2vec

        return pretrain_word2vec(recipe)
    from huggingface_hub import get_token
    from tqdm.auto import tqdm

    from mlm_pretrain.batches import prefetched, training_batches
    from mlm_pretrain.checkpoint import (
        checkpoint_size_estimate,
        load_checkpoint,
        save_checkpoint,
        warn_if_disk_low,
    )
    from mlm_pretrain.hub import push_checkpoint
    from mlm_pretrain.launch import start_accelerator, threads_per_process
    from mlm_pretrain.models import build_model, count_parameters
    from mlm_pretrain.objectives.mlm import SparseMLM
    from mlm_pretrain.optim import build_optimizer, lr_factor, set_lr
    from mlm_pretrain.packing import TokenInfo
    from mlm_pretrain.parallel import parallelize
    from mlm_pretrain.run_dir import checkpoint_to_resume, hold_run_dir, write_recipe
    from mlm_pretrain.run_log import RunLog, run_config
    from mlm_pretrain.tokenizer import load_tokenizer

    started = time.perf_counter()  # a minutes budget is the user's clock: set-up, evaluations, checkpoints
    impl, optim = recipe.impl, recipe.optim
    run_dir = Path(impl.out)
    accelerator = start_accelerator(run_dir, mixed_precision=impl.mixed_precision, log_with=impl.log_with)
    hold_run_dir(run_dir, accelerator)
    world, rank = accelerator.num_processes, accelerator.process_index
    torch.set_num_threads(impl.threads or threads_per_process())
    micro = optim.micro_batch_size
    if optim.batch_size % (micro * world):
        raise InputError(
            f"optim.batch_size {optim.batch_size} is not a multiple of optim.micro_batch_size "
            f"{micro} x {world} processes"
        )
    if impl.push_to_hub and get_token() is None:  # fail now, not at the first push hours from now
        raise InputError(
            f"impl.push_to_hub={impl.push_to_hub} needs a Hub token: set HF_TOKEN or run `hf auth login`"
        )
    checkpoint = checkpoint_to_resume(recipe, run_dir)
    write_recipe(recipe, run_dir, accelerator)

    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    info = TokenInfo(tokenizer)
    model = build_model(recipe.model, tokenizer, recipe.data.seq_len)
    if accelerator.is_main_process:
        warn_if_disk_low(run_dir, checkpoint_size_estimate(model))
    # the head sees a different number of masked positions every step: compiled apart, with dynamic shapes
    objective = parallelize(SparseMLM(model, compile_head=impl.compile), impl, accelerator)
    optimizer = build_optimizer(objective, optim.lr, optim.weight_decay, tuple(optim.betas), optim.eps)
    batches = training_batches(
        recipe, tokenizer, info, device=accelerator.device, rank=rank, world_size=world
    )

    step, elapsed_before, metrics = 0, 0.0, {}
    if checkpoint is not None:
        data_state, trainer_state = load_checkpoint(checkpoint, accelerator, objective, optimizer)
        batches.load_state_dict(data_state)
        step, elapsed_before = trainer_state["step"], trainer_state["elapsed"]
        log.info("resumed from %s (step %d)", checkpoint, step)
    elapsed = elapsed_before
    run_log = RunLog(run_dir, accelerator, run_config(asdict(recipe), len(tokenizer)), resumed_step=step)
    tokens_per_step = optim.batch_size * recipe.data.seq_len  # training blocks are never padded
    if accelerator.is_main_process:
        log.info(
            "%s: %.2fM parameters on %s (precision %s), %d processes x %d blocks x %d accumulation steps, "
            "%d tokens/step",
            model.config.model_type,
            count_parameters(model) / 1e6,
            accelerator.device,
            accelerator.mixed_precision,
            world,
            micro,
            batches.accumulation,
            tokens_per_step,
        )

    def progress() -> float:
        done = [
            step / recipe.max_steps if recipe.max_steps else 0.0,
            step * tokens_per_step / recipe.max_tokens if recipe.max_tokens else 0.0,
            elapsed / (60 * recipe.max_minutes) if recipe.max_minutes else 0.0,
        ]
        return max(done)

    def export_to(directory: Path) -> Path | None:
        """Every process calls this (FSDP gathers the shards); the main process writes."""
        state = full_state_dict(accelerator.unwrap_model(objective))
        if not accelerator.is_main_process:
            return None
        model = accelerator.unwrap_model(objective).model
        return export(recipe, model, state, tokenizer, directory, metrics, step * tokens_per_step, step)

    bar = tqdm(
        total=recipe.max_steps,
        initial=step,
        desc="pretraining",
        unit="step",
        disable=not (impl.progress and accelerator.is_main_process),
    )
    window_start, window_steps, skipped_in_a_row = time.perf_counter(), 0, 0
    with StopRequest() as stop, prefetched(batches, impl.prefetch) as steps:
        while progress() < 1.0:
            lr = optim.lr * lr_factor(progress(), optim.schedule, optim.warmup, optim.decay)
            set_lr(optimizer, lr)
            loss_sum, masked = forward_backward(objective, next(steps), accelerator)
            applied = apply_update(objective, optimizer, loss_sum, optim.clip, accelerator)
            step += 1
            window_steps += 1
            elapsed = elapsed_before + time.perf_counter() - started
            if recipe.max_minutes:  # every process must stop at the same step
                elapsed = float(accelerator.reduce(torch.tensor(elapsed, device=accelerator.device), "max"))
            bar.update(1)
            skipped_in_a_row = 0 if applied else skipped_in_a_row + 1
            if skipped_in_a_row:
                handle_nonfinite(optim, step, skipped_in_a_row, run_dir, run_log)

            finished = progress() >= 1.0
            if step % impl.log_every == 0 or finished:
                loss_value = float(accelerator.reduce(loss_sum, "sum") / masked)
                now = time.perf_counter()
                speed = window_steps * tokens_per_step / (now - window_start)
                window_start, window_steps = now, 0
                run_log.log(step, loss=loss_value, lr=lr, tokens=step * tokens_per_step, tokens_per_s=speed)
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{speed:,.0f}")
            if step % impl.eval_every == 0 and not finished:
                metrics = evaluate(accelerator.unwrap_model(objective), recipe, tokenizer, info, accelerator)
                run_log.log(step, **metrics)
            stopping = stop.requested(accelerator)
            if step % impl.save_every == 0 or finished or stopping:
                check_finite(objective, step, run_dir, accelerator)
                save_checkpoint(
                    run_dir,
                    step,
                    accelerator,
                    objective,
                    optimizer,
                    steps.state_dict(),
                    {"step": step, "elapsed": elapsed, "tokens": step * tokens_per_step},
                    impl.keep_last,
                )
                pushes_due = impl.push_every and (step // impl.save_every) % impl.push_every == 0
                if impl.push_to_hub and pushes_due and not finished:
                    exported = export_to(run_dir / "hub_export")
                    if exported:
                        push_checkpoint(exported, impl.push_to_hub, step=step)
            if stopping:
                bar.close()
                stop.stop(stopping, step, run_dir)
    bar.close()

    metrics = evaluate(accelerator.unwrap_model(objective), recipe, tokenizer, info, accelerator)
    run_log.log(step, **metrics)
    if export_to(run_dir / "final") and impl.push_to_hub:
        push_checkpoint(run_dir / "final", impl.push_to_hub, step=step)
    accelerator.wait_for_everyone()
    run_log.close()  # ends accelerate's trackers, and with them the process group: last
    return metrics


def forward_backward(objective: torch.nn.Module, batch, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate the gradients of this rank's share of a global batch (a `batches.Step`); return the
    rank's summed loss and the global batch's masked-token count, on the batch's device, without a
    host sync.

    Each micro-batch's loss is divided by the masked count of the whole global batch, so one process
    with a batch of 8 and two with 4 each compute the same gradient; gradients are synced once, on the
    last micro-batch."""
    world = accelerator.num_processes
    masked = accelerator.reduce(batch.masked, "sum")
    loss_sum = torch.zeros((), device=batch.masked.device)
    last = len(batch.micro_batches) - 1
    for i, micro in enumerate(batch.micro_batches):
        with no_gradient_sync(objective) if i < last else nullcontext(), accelerator.autocast():
            loss, _ = objective(
                micro.input_ids, micro.attention_mask, micro.positions, micro.labels, count_correct=False
            )
            # DDP and FSDP average gradients over processes; scale so they sum to d(total loss / masked)
            accelerator.backward(loss * world / masked)
        loss_sum += loss.detach()
    return loss_sum, masked


def apply_update(
    objective: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_sum: torch.Tensor,
    clip: float,
    accelerator,
) -> bool:
    """Clip and step, unless the loss or the gradient norm is not finite on some rank: then every rank
    skips the update. Returns whether it was applied (deciding costs one host sync a step)."""
    finite = torch.isfinite(loss_sum)
    if clip > 0:
        finite &= torch.isfinite(clip_grad_norm(objective, clip))
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite.float(), "min") > 0
    applied = bool(finite)
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return applied


def handle_nonfinite(optim: OptimRecipe, step: int, in_a_row: int, run_dir: Path, run_log) -> None:
    """After a step whose update was skipped for a non-finite loss or gradient: go on, counting it, or
    stop with an error naming the step and the last checkpoint, as `optim.on_nonfinite` says."""
    from mlm_pretrain.checkpoint import latest_checkpoint

    run_log.log(step, skipped_nonfinite=in_a_row)
    if optim.on_nonfinite == "skip" and in_a_row <= optim.max_skips_in_a_row:
        log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", step, in_a_row)
        return
    last = latest_checkpoint(run_dir)
    raise Diverged(
        f"step {step}: the loss or gradient norm is not finite"
        + (f" ({in_a_row} steps in a row)" if optim.on_nonfinite == "skip" else "")
        + f"; stopped without saving. Last good checkpoint: {last or 'none'}. Lower optim.lr or "
        "raise optim.warmup (a new --out, since the plan changes), or set optim.on_nonfinite=skip."
    )


def check_finite(objective: torch.nn.Module, step: int, run_dir: Path, accelerator) -> None:
    """Never save non-finite weights (a finite gradient can still overflow a weight). Every process
    checks what it holds (a shard, with FSDP) and they decide together."""
    from torch.distributed.tensor import DTensor

    local = [p.to_local() if isinstance(p, DTensor) else p for p in objective.parameters()]
    bad = sum(int(not torch.isfinite(p).all()) for p in local)
    if accelerator.num_processes > 1:
        bad = int(accelerator.reduce(torch.tensor(bad, device=accelerator.device), "sum"))
    if bad:
        raise Diverged(f"step {step}: non-finite weights ({bad} tensors); not saved in {run_dir}")


@torch.no_grad()
def evaluate(objective: torch.nn.Module, recipe: PretrainRecipe, tokenizer, info, accelerator) -> dict:
    """MLM loss per masked token (not per batch), perplexity and masked-token accuracy on held-out text."""
    from mlm_pretrain.batches import evaluation_batches
    from mlm_pretrain.corpus import TextStream
    from mlm_pretrain.packing import BlockStream

    world, rank = accelerator.num_processes, accelerator.process_index
    documents = TextStream(recipe.data.validation, text_field=recipe.data.text_field, shuffle_files=False)
    stream = BlockStream(documents, tokenizer, recipe.data.seq_len, rank=rank, world_size=world)
    batches = evaluation_batches(
        stream,
        info,
        recipe.mlm,
        micro_batch_size=recipe.optim.micro_batch_size,
        max_blocks=recipe.impl.eval_blocks,
        device=accelerator.device,
        rank=rank,
        world_size=world,
    )
    totals = score_batches(objective, batches, accelerator)
    loss, correct, masked = accelerator.reduce(totals, "sum").tolist()
    if masked == 0:
        raise InputError(f"validation text {recipe.data.validation} gave no tokens to evaluate on")
    return {
        "eval_loss": loss / masked,
        "eval_perplexity": math.exp(loss / masked),
        "eval_accuracy": correct / masked,
        "eval_masked_tokens": int(masked),
    }


@torch.no_grad()
def score_batches(objective: torch.nn.Module, batches, accelerator) -> torch.Tensor:
    """(summed loss, correct predictions, masked tokens) of this rank's micro-batches, on their device."""
    totals = None
    objective.eval()
    for micro in batches:
        with accelerator.autocast():
            loss, correct = objective(micro.input_ids, micro.attention_mask, micro.positions, micro.labels)
        scores = torch.stack([loss.float(), correct.float(), loss.new_tensor(float(len(micro.labels)))])
        totals = scores if totals is None else totals + scores
    objective.train()
    return totals if totals is not None else torch.zeros(3, device=accelerator.device)


def export(
    recipe: PretrainRecipe,
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    tokenizer,
    out_dir: Path,
    metrics: dict,
    tokens: int,
    steps: int,
) -> Path:
    from mlm_pretrain.checkpoint import export_model

    recipe_yaml = yaml.safe_dump(asdict(recipe), sort_keys=False)
    card = model_card(recipe, metrics, tokens, steps, recipe_yaml, tokenizer.mask_token)
    return export_model(model, tokenizer, out_dir, card, recipe_yaml, state=state)


def model_card(
    recipe: PretrainRecipe, metrics: dict, tokens: int, steps: int, recipe_yaml: str, mask_token: str
) -> str:
    m = recipe.model
    sources = ", ".join(str(s if isinstance(s, str) else s.get("path")) for s in recipe.data.corpus)
    rows = "\n".join(
        f"| {k.removeprefix('eval_').replace('_', ' ')} | {f'{v:.4f}' if isinstance(v, float) else v} |"
        for k, v in metrics.items()
    )
    return f"""---
library_name: transformers
pipeline_tag: fill-mask
tags: [mlm-pretrain, {m.type}, masked-lm]
---
# {m.type} encoder pretrained with mlm-pretrain

A {m.num_layers}-layer, {m.hidden_size}-wide {m.type} masked-language model trained from scratch for
{steps} steps ({tokens:,} tokens) with masked-token modelling ({recipe.mlm.masking} masking at rate
{recipe.mlm.mask_rate}). Load it with `AutoModelForMaskedLM.from_pretrained(dir)` or fine-tune it with
`AutoModelForSequenceClassification.from_pretrained(dir)`; no custom code is needed.

```python
from transformers import pipeline

fill_mask = pipeline("fill-mask", model="path/to/this/directory")  # or its Hub repo id
fill_mask("It is a truth universally {mask_token}.", tokenizer_kwargs={{"truncation": True}})
```
With `truncation=True`, a longer input is cut to the tokenizer's `model_max_length`: the positions the
model has.

## Data
Corpus: {sources} (text field `{recipe.data.text_field}`), streamed, packed into {recipe.data.seq_len}-token
blocks RoBERTa FULL-SENTENCES style. Tokenizer: `{recipe.data.tokenizer}` (saved here too). Validation:
{", ".join(recipe.data.validation)}.

## Final metrics (validation, masking at {recipe.mlm.eval_mask_rate})
| metric | value |
|---|---|
{rows}

## Recipe
```yaml
{recipe_yaml}```
"""
