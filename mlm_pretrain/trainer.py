"""The pretraining loop of the torch objectives (mlm, electra), inside the one `run.Run`.

The loop reads top to bottom: build, maybe resume, then per step draw the global batch's blocks,
mask them, accumulate gradients, clip, step, and log, evaluate, checkpoint on their cadence. What is
not the objective's (process group, resume decision, stop rules and signals, checkpoints, export,
card, errors every rank agrees on) is the run's.

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
import typing
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from mlm_pretrain.errors import InputError
from mlm_pretrain.parallel import clip_grad_norm, full_state_dict, no_gradient_sync
from mlm_pretrain.schema import OptimRecipe, PretrainRecipe, Word2VecObjective

log = logging.getLogger(__name__)


class Diverged(InputError):
    """The loss or the weights stopped being finite: the recipe's learning rate or warmup is at fault."""


def pretrain(recipe: PretrainRecipe) -> dict:
    """Run (or resume) the recipe; return the final evaluation metrics. Every process calls this."""
    if recipe.objective in typing.get_args(Word2VecObjective):
        from mlm_pretrain.word2vec_trainer import pretrain_word2vec

        return pretrain_word2vec(recipe)
    from mlm_pretrain.batches import prefetched, training_batches
    from mlm_pretrain.checkpoint import CheckpointFiles, load_checkpoint, mlm_files, warn_if_disk_low
    from mlm_pretrain.objectives import build_objective
    from mlm_pretrain.optim import build_optimizer, lr_factor, set_lr
    from mlm_pretrain.packing import TokenInfo
    from mlm_pretrain.parallel import parallelize
    from mlm_pretrain.run import Run
    from mlm_pretrain.tokenizer import load_tokenizer

    impl, optim = recipe.impl, recipe.optim
    with Run(recipe) as run:
        accelerator = run.accelerator
        torch.manual_seed(recipe.seed)
        random.seed(recipe.seed)
        tokenizer = load_tokenizer(recipe.data.tokenizer)
        info = TokenInfo(tokenizer)
        objective = parallelize(build_objective(recipe, tokenizer, compile=impl.compile), impl, accelerator)
        optimizer = build_optimizer(objective, optim.lr, optim.weight_decay, tuple(optim.betas), optim.eps)
        batches = training_batches(
            recipe, tokenizer, info, device=accelerator.device, rank=run.rank, world_size=run.world
        )
        if run.main:
            warn_if_disk_low(run.run_dir, mlm_files(accelerator, objective, optimizer, {}).size_estimate)
        if run.checkpoint is not None:
            batches.load_state_dict(load_checkpoint(run.checkpoint, accelerator, objective, optimizer))
        run.begin(len(tokenizer))
        tokens_per_step = optim.batch_size * recipe.data.seq_len  # training blocks are never padded
        describe_run(run, objective, batches, tokens_per_step)

        def evaluation() -> dict:
            return evaluate(accelerator.unwrap_model(objective), recipe, tokenizer, info, accelerator)

        def checkpoint_files() -> CheckpointFiles:
            check_finite(objective, run.step, run.run_dir, accelerator)
            return mlm_files(accelerator, objective, optimizer, steps.state_dict())

        metrics, skipped_in_a_row = {}, 0
        with prefetched(batches, impl.prefetch) as steps:
            while not run.finished():
                lr = optim.lr * lr_factor(run.progress(), optim.schedule, optim.warmup, optim.decay)
                set_lr(optimizer, lr)
                loss_sum, masked = forward_backward(objective, next(steps), accelerator)
                applied = apply_update(objective, optimizer, loss_sum, optim.clip, accelerator)
                run.step_done(tokens_per_step)
                skipped_in_a_row = 0 if applied else skipped_in_a_row + 1
                if skipped_in_a_row:
                    handle_nonfinite(optim, run, skipped_in_a_row)
                if run.due(impl.log_every) or run.finished():
                    run.log_training(loss=float(accelerator.reduce(loss_sum, "sum") / masked), lr=lr)
                if run.due(impl.eval_every) and not run.finished():
                    metrics = evaluation()
                    run.log(**metrics)
                run.end_step(checkpoint_files)
                if run.push_due():
                    run.push(run.export(run.run_dir / "hub_export", exported(objective, tokenizer), metrics))
        metrics = evaluation()
        run.finish(metrics, exported(objective, tokenizer))
    return metrics


def exported(objective: torch.nn.Module, tokenizer) -> Callable[[Path], None]:
    """The objective's export files, written into a directory by the main process; the weights are
    gathered now, by every process (FSDP holds shards)."""
    unwrapped = getattr(objective, "module", objective)
    state = full_state_dict(unwrapped)
    return lambda directory: unwrapped.export(directory, state, tokenizer)


def describe_run(run, objective: torch.nn.Module, batches, tokens_per_step: int) -> None:
    from mlm_pretrain.models import count_parameters

    if run.main:
        log.info(
            "%s %s: %.2fM parameters on %s (precision %s), %d processes x %d blocks x %d accumulation steps, "
            "%d tokens/step",
            run.recipe.objective,
            run.recipe.model.type,
            count_parameters(objective) / 1e6,
            run.accelerator.device,
            run.accelerator.mixed_precision,
            run.world,
            batches.micro,
            batches.accumulation,
            tokens_per_step,
        )


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
    # the gradient norm is checked with clipping off too: an infinite gradient with a finite loss
    finite = torch.isfinite(loss_sum) & torch.isfinite(clip_grad_norm(objective, clip))
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite.float(), "min") > 0
    applied = bool(finite)
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return applied


def handle_nonfinite(optim: OptimRecipe, run, in_a_row: int) -> None:
    """After a step whose update was skipped for a non-finite loss or gradient: go on, counting it, or
    stop with an error naming the step and the last checkpoint, as `optim.on_nonfinite` says."""
    from mlm_pretrain.checkpoint import latest_checkpoint

    step = run.step
    run.log(skipped_nonfinite=in_a_row)
    if optim.on_nonfinite == "skip" and in_a_row <= optim.max_skips_in_a_row:
        log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", step, in_a_row)
        return
    last = latest_checkpoint(run.run_dir)
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
    """MLM loss per masked token (not per batch), perplexity and masked-token accuracy on held-out text.

    The same weights score the same in any number of processes: every process makes the same
    micro-batches (`evaluation_batches`), scores every world-th one into its row of a table the
    processes add up (zeros elsewhere: exact), and the rows are summed in one order, in float64. Every
    process runs the same number of forward passes (FSDP gathers weights inside them), a process
    past the end re-running the last micro-batch and dropping its scores."""
    from mlm_pretrain.batches import evaluation_batches
    from mlm_pretrain.corpus import TextStream
    from mlm_pretrain.packing import BlockStream

    documents = TextStream(recipe.data.validation, text_field=recipe.data.text_field, shuffle_files=False)
    micro_batches = evaluation_batches(
        BlockStream(documents, tokenizer, recipe.data.seq_len),
        info,
        recipe.mlm,
        micro_batch_size=recipe.optim.micro_batch_size,
        max_blocks=recipe.impl.eval_blocks,
        device=accelerator.device,
    )
    if not micro_batches:
        raise InputError(f"validation text {recipe.data.validation} gave no tokens to evaluate on")
    scores = score_micro_batches(objective, micro_batches, accelerator)
    loss, correct, masked, *detection = scores.sum(0).tolist()
    if masked == 0:
        raise InputError(f"validation text {recipe.data.validation} has no token to mask")
    metrics = {
        "eval_loss": loss / masked,
        "eval_perplexity": math.exp(loss / masked),
        "eval_accuracy": correct / masked,
        "eval_masked_tokens": int(masked),
    }
    if detection:
        detection_loss, calls, real, replaced = detection
        metrics |= {
            "eval_detection_loss": detection_loss / real,
            "eval_detection_accuracy": calls / real,
            "eval_replaced_fraction": replaced / real,
            # what a discriminator that learned nothing scores: always the replaced fraction's odds, so
            # the two losses (and accuracy against 1 - replaced fraction) say whether detection learns
            "eval_detection_baseline_loss": binary_entropy(replaced / real),
        }
    return metrics


def binary_entropy(p: float) -> float:
    """Cross-entropy in nats of always predicting probability `p` for labels whose mean is `p`."""
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log(p) + (1 - p) * math.log(1 - p))


@torch.no_grad()
def score_micro_batches(objective: torch.nn.Module, micro_batches: list, accelerator) -> torch.Tensor:
    """(summed loss, correct predictions, masked tokens) of each micro-batch, one row each, in float64
    on their device, the same table in every process: each scores every world-th micro-batch and the
    processes add up their tables. An objective with a discriminator (electra) adds its
    `discriminator_scores` (summed detection loss, correct calls, real tokens, replaced tokens)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    detects = hasattr(objective, "discriminator_scores")
    device = micro_batches[0].labels.device
    scores = torch.zeros(len(micro_batches), 7 if detects else 3, dtype=torch.float64, device=device)
    objective.eval()
    for first in range(0, len(micro_batches), world):
        index = first + rank
        micro = micro_batches[min(index, len(micro_batches) - 1)]
        inputs = micro.input_ids, micro.attention_mask, micro.positions, micro.labels
        with accelerator.autocast():
            loss, correct = objective(*inputs)
            row = [loss.double(), correct.double(), loss.new_tensor(len(micro.labels)).double()]
            if detects:
                row += list(objective.discriminator_scores(*inputs).double())
        if index < len(micro_batches):
            scores[index] = torch.stack(row)
    objective.train()
    return accelerator.reduce(scores, "sum") if world > 1 else scores
