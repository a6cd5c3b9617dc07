"""Fine-tune an encoder checkpoint on a task: a learning-rate grid, several seeds, early stopping, the
median score, a baseline beside it.

The protocol is Cramming's "GLUE-sane" one: one hyper-parameter set for every task (FinetuneConfig),
several seeds, the median reported; only the peak learning rate is chosen per task, from a small grid,
by the median validation score over the seeds, so that a pretrained checkpoint and the same
architecture from random initialisation each get the rate that suits them by the same procedure. The
test score reported is that rate's. The defaults suit small encoders (hidden 32-512): lr 1e-4 with 10%
warmup and linear decay, batch 32, up to 5 epochs, stopping after 2 epochs without progress on
validation and restoring the best epoch's weights. For BERT-base sized models use lr 2e-5 to 5e-5.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from mlm_pretrain.errors import InputError
from mlm_pretrain.finetune.baseline import tfidf_baseline
from mlm_pretrain.finetune.batching import collate, encode, length_grouped_batches, sorted_batches
from mlm_pretrain.finetune.results import update_model_card, write_results
from mlm_pretrain.finetune.scoring import score_predictions
from mlm_pretrain.finetune.tasks import Task, load_task
from mlm_pretrain.optim import build_optimizer, lr_factor, set_lr

if TYPE_CHECKING:
    import torch

    from mlm_pretrain.hub import PushResult

log = logging.getLogger(__name__)

MODEL_SUBDIR = "model"  # the fine-tuned model, under the results directory


@dataclass
class FinetuneConfig:
    epochs: int = 5
    lrs: Sequence[float] = (1e-4,)  # peak learning rates tried; the best by median validation score is kept
    batch_size: int = 32
    warmup: float = 0.1  # fraction of the run
    schedule: str = "linear"
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_length: int = 128
    patience: int = 2  # epochs without a better validation score before stopping
    mixed_precision: str = "no"  # or "bf16"
    # torch threads; default: torch's (all cores). On a shared machine, 1 thread can be 10x faster for a
    # small model than 2 threads waiting for each other behind other processes.
    threads: int | None = None
    eval_batch_size: int = 128
    # The classifier's input: the first token's state, or the mean over the sequence's tokens. Set through
    # the model's own `classifier_pooling` (ModernBERT), so the export loads with no project code.
    pooling: str = "cls"
    # Layer-wise learning-rate decay: each encoder layer learns at this fraction of the rate of the one
    # above it, the classifier at the peak rate (ELECTRA's fine-tuning; 1.0: every layer at the peak).
    layer_decay: float = 1.0


@dataclass
class EncodedTask:
    """A task's splits as token ids. The scored ones are kept apart: GLUE's scored dev set is named
    `validation` too, and is not the split early stopping watches."""

    train: list[dict]
    validation: list[dict]
    scored: dict[str, list[dict]]


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's tokenizer, checked against the model's embedding table."""
    from transformers import AutoConfig, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise InputError(f"{model_dir}: not a model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab_size = AutoConfig.from_pretrained(model_dir).vocab_size
    if len(tokenizer) > vocab_size:
        raise InputError(
            f"{model_dir}: the tokenizer has {len(tokenizer)} tokens, the model's vocab_size is {vocab_size}"
        )
    if tokenizer.pad_token_id is None:
        raise InputError(f"{model_dir}: the tokenizer has no pad token")
    return tokenizer


def build_classifier(model_dir: str | Path, task: Task, from_scratch: bool = False, pooling: str = "cls"):
    """The checkpoint with a fresh classification (or regression) head, or, `from_scratch`, the same
    architecture with every weight freshly initialised: the baseline that shows what pretraining adds."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if pooling != "cls" and not hasattr(AutoConfig.from_pretrained(model_dir), "classifier_pooling"):
        raise InputError(
            f"{model_dir}: pooling {pooling!r} needs a model whose config has `classifier_pooling` "
            "(ModernBERT); this one classifies from its first token only"
        )
    options = {
        "num_labels": task.num_labels,
        "problem_type": "regression" if task.is_regression else "single_label_classification",
    }
    if task.label_names is not None:
        options["id2label"] = dict(enumerate(task.label_names))
        options["label2id"] = {name: i for i, name in enumerate(task.label_names)}
    if pooling != "cls":
        options["classifier_pooling"] = pooling
    if from_scratch:
        return AutoModelForSequenceClassification.from_config(
            AutoConfig.from_pretrained(model_dir, **options)
        )
    return AutoModelForSequenceClassification.from_pretrained(model_dir, **options)


def layer_decay_scale(layers: int, decay: float) -> Callable[[str], float]:
    """A parameter's learning rate as a fraction of the peak, by its name: `decay` to the power of its
    distance from the top, counting the embeddings as the bottom layer and the classifier head (and
    anything else outside the numbered layers, as a final norm) as the top."""

    def scale(name: str) -> float:
        if "embeddings" in name:
            depth = 0
        elif numbered := re.search(r"\.layers?\.(\d+)\.", name):
            depth = int(numbered.group(1)) + 1
        else:
            depth = layers + 1
        return decay ** (layers + 1 - depth)

    return scale


def finetune(
    model_dir: str | Path,
    task: Task | str,
    out_dir: str | Path | None = None,
    *,
    seeds: int = 3,
    config: FinetuneConfig | None = None,
    from_scratch: bool = False,
    baseline: bool = True,
    random_init: bool = False,
) -> dict:
    """Fine-tune `seeds` times at each learning rate of `config.lrs`, keep the rate with the best median
    validation score, and return the results dict.

    With `out_dir`, the results go there (results.json, results.md, results.png) and so does the
    fine-tuned model, in `out_dir/model/` (`MODEL_SUBDIR`): of the chosen rate's seeds, the one with the
    best validation score, with its tokenizer and a model card whose `model-index` holds its scores.
    `random_init` also fine-tunes the same architecture from random weights by the same procedure and
    reports it beside (`result["random_init"]`). Nothing is written inside `model_dir`: its card, with a
    "Fine-tuning results" section added, goes to `out_dir/PRETRAINED_CARD` (not for a `from_scratch`
    run, whose scores are not the checkpoint's). A `config.max_length` beyond the model's positions is
    lowered to them, with a warning, as an index error halfway through would be the alternative.
    """
    from transformers import AutoConfig

    from mlm_pretrain.models import usable_positions

    config = config or FinetuneConfig()
    if not config.lrs:
        raise InputError("no fine-tuning learning rate given")
    if random_init and from_scratch:
        raise InputError(
            "random_init (--random-init) sets random initialisation beside a pretrained checkpoint; "
            "from_scratch (--from-scratch) already fine-tunes from random weights: choose one"
        )
    task = load_task(task) if isinstance(task, str) else task
    tokenizer = load_tokenizer(model_dir)
    if config.max_length > (positions := usable_positions(AutoConfig.from_pretrained(model_dir))):
        log.warning(
            "%s has %d positions: fine-tuning on its first %d tokens, not max_length %d",
            model_dir,
            positions,
            positions,
            config.max_length,
        )
        config = replace(config, max_length=positions)
    encoded = EncodedTask(
        train=encode(tokenizer, task.train, config.max_length),
        validation=encode(tokenizer, task.validation, config.max_length),
        scored={name: encode(tokenizer, split, config.max_length) for name, split in task.scored.items()},
    )
    keep = out_dir is not None
    pad = tokenizer.pad_token_id
    lr, grid, runs, best = run_grid(model_dir, task, encoded, config, seeds, from_scratch, keep, pad)
    result = {
        "task": task.name,
        "source": task.source,
        "metrics": list(task.metrics),
        "model_dir": str(model_dir),
        "init": "random" if from_scratch else "pretrained",
        "config": asdict(config),
        "lr": lr,
        "grid": grid,
        "train_rows": len(task.train),
        "validation_rows": len(task.validation),
        "notes": task.notes,
        "seeds": runs,
        "median": _medians(task, runs),
        "baseline": tfidf_baseline(task) if baseline else None,
        "random_init": None,
        "saved_model": None,
    }
    if random_init:
        scratch_lr, scratch_grid, scratch_runs, _ = run_grid(
            model_dir, task, encoded, config, seeds, True, False, pad
        )
        result["random_init"] = {
            "lr": scratch_lr,
            "grid": scratch_grid,
            "seeds": scratch_runs,
            "median": _medians(task, scratch_runs),
        }
    if out_dir is not None:
        model, seed = best
        result["saved_model"] = {"path": str(Path(out_dir) / MODEL_SUBDIR), "seed": seed}
        write_results(result, out_dir)
        save_finetuned(model, tokenizer, result, Path(out_dir) / MODEL_SUBDIR)
        if not from_scratch:
            update_model_card(model_dir, result, out_dir)
    return result


def run_grid(
    model_dir: str | Path,
    task: Task,
    encoded: EncodedTask,
    config: FinetuneConfig,
    seeds: int,
    from_scratch: bool,
    keep_model: bool,
    pad_token_id: int,
) -> tuple[float, list[dict], list[dict], tuple | None]:
    """Every rate of `config.lrs` with every seed; return the rate with the best median validation score
    (the first of equal ones), the grid's medians, that rate's runs and, with `keep_model`, (model, seed)
    of its run with the best validation score, the lower validation loss breaking ties.

    Every run scored the test splits (cheaper than keeping every run's weights to score the chosen ones
    later), but only the chosen rate's scores are reported. At most two models are kept at a time: the
    best of this rate's seeds so far and that of the best rate so far.
    """
    grid, chosen = [], None
    for lr in config.lrs:
        runs, best_rank, best = [], None, None
        for seed in range(seeds):
            run, model = run_seed(model_dir, task, encoded, config, lr, seed, from_scratch, pad_token_id)
            runs.append(run)
            rank = (run["validation_score"], -run["history"][run["best_epoch"] - 1]["validation"]["loss"])
            if keep_model and (best_rank is None or rank > best_rank):
                best_rank, best = rank, (model, seed)
            del model  # else a run's weights outlive it while the next run trains
        median = statistics.median(run["validation_score"] for run in runs)
        grid.append({"lr": lr, "validation_median": median})
        if chosen is None or median > chosen[0]:
            chosen = (median, lr, runs, best)
    _, lr, runs, best = chosen
    return lr, grid, runs, best


def save_finetuned(model, tokenizer, result: dict, out_dir: Path) -> Path:
    """The fine-tuned model as a Hugging Face directory `pipeline("text-classification")` loads: weights
    (safetensors), config with the task's class names as labels, tokenizer, README.md with `model-index`,
    results.json and results.png. Written whole, replacing an older one only when complete."""
    from mlm_pretrain.checkpoint import atomic_directory
    from mlm_pretrain.finetune.results import PLOT, finetuned_card, plot_results
    from mlm_pretrain.models import make_config_portable, usable_positions
    from mlm_pretrain.tokenizer import save_tokenizer

    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with atomic_directory(out_dir, size_estimate=weights) as partial:
        model.save_pretrained(partial, safe_serialization=True)
        make_config_portable(partial)
        save_tokenizer(tokenizer, partial, model_max_length=usable_positions(model.config))
        (partial / "README.md").write_text(finetuned_card(result))
        (partial / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_results([result], partial / PLOT)
    return out_dir


def push_finetuned(result: dict, repo_id: str, **kwargs) -> PushResult:
    """Push the model `finetune` saved (`result["saved_model"]`) to the Hub model repo `repo_id`, its card
    rewritten to name the repo. `kwargs` go to `hub.push_to_hub` (private, token, endpoint, revision)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from mlm_pretrain.finetune.results import finetuned_card
    from mlm_pretrain.hub import push_to_hub

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:  # before the card names it
        raise InputError(f"--push {repo_id!r}: {err}") from err
    model_dir = Path(result["saved_model"]["path"])
    (model_dir / "README.md").write_text(finetuned_card(result, repo_id))
    message = f"Upload a {result['task']} classifier fine-tuned with mlm-pretrain"
    return push_to_hub(model_dir, repo_id, commit_message=message, **kwargs)


def _medians(task: Task, runs: list[dict]) -> dict[str, float]:
    return {name: statistics.median(run["scores"][name]["score"] for run in runs) for name in task.scored}


def run_seed(
    model_dir: str | Path,
    task: Task,
    encoded: EncodedTask,
    config: FinetuneConfig,
    lr: float,
    seed: int,
    from_scratch: bool,
    pad_token_id: int,
) -> tuple[dict, torch.nn.Module]:
    """One fine-tuning run: train with early stopping, restore the best epoch, score the scored splits.
    Returns the run's record and its model, with the best epoch's weights.

    The best epoch has the best validation score, the lower validation loss breaking ties. An epoch
    makes progress when it is the best so far or lowers the validation loss: a small model's score can
    sit at the majority class for a few epochs while the loss falls, before it moves at all, and
    stopping on the score alone ends such a run before it has learnt anything.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    set_seed(seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    model = build_classifier(model_dir, task, from_scratch, config.pooling)
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    scale = layer_decay_scale(model.config.num_hidden_layers, config.layer_decay)
    optimizer = build_optimizer(model, lr, config.weight_decay, lr_scale=scale)
    model, optimizer = accelerator.prepare(model, optimizer)
    train, labels = encoded.train, task.train.labels
    lengths = [len(example["input_ids"]) for example in train]
    label_dtype = torch.float32 if task.is_regression else torch.long
    rng = random.Random(seed)
    total_steps = config.epochs * math.ceil(len(train) / config.batch_size)

    step, train_seconds, examples_seen = 0, 0.0, 0
    best, best_epoch, best_state, lowest_loss, progress_epoch, history = None, 0, None, math.inf, 0, []
    for epoch in range(1, config.epochs + 1):
        model.train()
        started, losses = time.perf_counter(), []
        batches = length_grouped_batches(lengths, config.batch_size, rng)
        for batch_ids in tqdm(
            batches, desc=f"{task.name} lr {lr:g} seed {seed} epoch {epoch}", leave=False, disable=None
        ):
            set_lr(optimizer, lr * lr_factor(step / total_steps, config.schedule, config.warmup))
            batch = collate([train[i] for i in batch_ids], pad_token_id)
            batch["labels"] = torch.tensor([labels[i] for i in batch_ids], dtype=label_dtype)
            loss = model(**{key: value.to(accelerator.device) for key, value in batch.items()}).loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            examples_seen += len(batch_ids)
        train_seconds += time.perf_counter() - started

        validation = evaluate(
            model, encoded.validation, task.validation.labels, task, config, accelerator, pad_token_id
        )
        history.append({"epoch": epoch, "train_loss": statistics.fmean(losses), "validation": validation})
        log.info(
            "%s lr %g seed %d epoch %d: loss %.4f, validation %s %.4f, loss %.4f",
            task.name,
            lr,
            seed,
            epoch,
            history[-1]["train_loss"],
            "/".join(task.metrics),
            validation["score"],
            validation["loss"],
        )
        # Constant predictions make a correlation NaN: rank that below any real score.
        rank = (-math.inf if math.isnan(validation["score"]) else validation["score"], -validation["loss"])
        if best is None or rank > best:
            best, best_epoch, progress_epoch = rank, epoch, epoch
            best_state = {
                k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()
            }
        if validation["loss"] < lowest_loss:
            lowest_loss, progress_epoch = validation["loss"], epoch
        if epoch - progress_epoch >= config.patience:
            break

    accelerator.unwrap_model(model).load_state_dict(best_state)
    scores = {
        name: evaluate(model, encoded.scored[name], split.labels, task, config, accelerator, pad_token_id)
        for name, split in task.scored.items()
    }
    run = {
        "seed": seed,
        "lr": lr,
        "validation_score": best[0],
        "scores": scores,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "train_examples_per_s": examples_seen / train_seconds,
        "history": history,
    }
    return run, accelerator.unwrap_model(model, keep_fp32_wrapper=False)


def evaluate(
    model,
    examples: list[dict],
    labels: list,
    task: Task,
    config: FinetuneConfig,
    accelerator,
    pad_token_id: int,
) -> dict:
    """The task's metrics on `examples` (`score`: their mean) and the loss the model trains on."""
    import torch
    import torch.nn.functional as F

    outputs = predict(model, examples, config, accelerator, pad_token_id)
    if task.is_regression:
        predictions = outputs[:, 0]
        loss = F.mse_loss(predictions, torch.tensor(labels, dtype=torch.float32))
    else:
        predictions = outputs.argmax(dim=-1)
        loss = F.cross_entropy(outputs, torch.tensor(labels, dtype=torch.long))
    return {**score_predictions(task, predictions.tolist(), labels), "loss": loss.item()}


def predict(model, examples: list[dict], config: FinetuneConfig, accelerator, pad_token_id: int):
    """The model's outputs for `examples`, in their order: a tensor of logits, one column for regression."""
    import torch

    model.eval()
    lengths = [len(example["input_ids"]) for example in examples]
    order, outputs = [], []
    with torch.no_grad(), accelerator.autocast():
        for batch_ids in sorted_batches(lengths, config.eval_batch_size):
            batch = collate([examples[i] for i in batch_ids], pad_token_id)
            logits = model(**{key: value.to(accelerator.device) for key, value in batch.items()}).logits
            order += batch_ids
            outputs.append(logits.float().cpu())
    return torch.cat(outputs)[torch.argsort(torch.tensor(order))]
