"""Fine-tune an encoder checkpoint on a task: several seeds, early stopping, median score, baseline beside it.

The protocol is Cramming's "GLUE-sane" one: a single hyper-parameter set for every task (FinetuneConfig),
several seeds, the median reported. The defaults suit small encoders (hidden 32-512): lr 1e-4 with 10%
warmup and linear decay, batch 32, up to 5 epochs, stopping when the validation score has not improved for
2 epochs and restoring the best epoch's weights. For BERT-base sized models use lr 2e-5 to 5e-5.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mlm_pretrain.errors import InputError
from mlm_pretrain.finetune.baseline import tfidf_baseline
from mlm_pretrain.finetune.batching import collate, encode, length_grouped_batches, sorted_batches
from mlm_pretrain.finetune.results import update_model_card, write_results
from mlm_pretrain.finetune.scoring import score_predictions
from mlm_pretrain.finetune.tasks import Task, load_task
from mlm_pretrain.optim import build_optimizer, lr_factor, set_lr

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    epochs: int = 5
    lr: float = 1e-4
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


def build_classifier(model_dir: str | Path, task: Task, from_scratch: bool = False):
    """The checkpoint with a fresh classification (or regression) head, or, `from_scratch`, the same
    architecture with every weight freshly initialised: the baseline that shows what pretraining adds."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    options = {
        "num_labels": task.num_labels,
        "problem_type": "regression" if task.is_regression else "single_label_classification",
    }
    if task.label_names is not None:
        options["id2label"] = dict(enumerate(task.label_names))
        options["label2id"] = {name: i for i, name in enumerate(task.label_names)}
    if from_scratch:
        return AutoModelForSequenceClassification.from_config(
            AutoConfig.from_pretrained(model_dir, **options)
        )
    return AutoModelForSequenceClassification.from_pretrained(model_dir, **options)


def finetune(
    model_dir: str | Path,
    task: Task | str,
    out_dir: str | Path | None = None,
    *,
    seeds: int = 3,
    config: FinetuneConfig | None = None,
    from_scratch: bool = False,
    baseline: bool = True,
) -> dict:
    """Fine-tune `seeds` times and return the results dict (also written to `out_dir` when given).

    A pretrained checkpoint's model card gets a "Fine-tuning results" section; a `from_scratch` run
    leaves the card alone, since its scores are not the checkpoint's.
    """
    config = config or FinetuneConfig()
    task = load_task(task) if isinstance(task, str) else task
    tokenizer = load_tokenizer(model_dir)
    encoded = {
        "train": encode(tokenizer, task.train, config.max_length),
        "validation": encode(tokenizer, task.validation, config.max_length),
    }
    encoded.update({name: encode(tokenizer, split, config.max_length) for name, split in task.scored.items()})
    runs = [
        run_seed(model_dir, task, encoded, config, seed, from_scratch, tokenizer.pad_token_id)
        for seed in range(seeds)
    ]
    result = {
        "task": task.name,
        "source": task.source,
        "metrics": list(task.metrics),
        "model_dir": str(model_dir),
        "init": "random" if from_scratch else "pretrained",
        "config": asdict(config),
        "train_rows": len(task.train),
        "validation_rows": len(task.validation),
        "notes": task.notes,
        "seeds": runs,
        "median": {
            name: statistics.median(run["scores"][name]["score"] for run in runs) for name in task.scored
        },
        "baseline": tfidf_baseline(task) if baseline else None,
    }
    if out_dir is not None:
        write_results(result, out_dir)
    if not from_scratch:
        update_model_card(model_dir, result)
    return result


def run_seed(
    model_dir: str | Path,
    task: Task,
    encoded: dict[str, list[dict]],
    config: FinetuneConfig,
    seed: int,
    from_scratch: bool,
    pad_token_id: int,
) -> dict:
    """One fine-tuning run: train with early stopping, restore the best epoch, score the scored splits."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    set_seed(seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    model = build_classifier(model_dir, task, from_scratch)
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    optimizer = build_optimizer(model, config.lr, config.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    train, labels = encoded["train"], task.train.labels
    lengths = [len(example["input_ids"]) for example in train]
    label_dtype = torch.float32 if task.is_regression else torch.long
    rng = random.Random(seed)
    total_steps = config.epochs * math.ceil(len(train) / config.batch_size)

    step, train_seconds, examples_seen = 0, 0.0, 0
    best_score, best_epoch, best_state, history = -math.inf, 0, None, []
    for epoch in range(1, config.epochs + 1):
        model.train()
        started, losses = time.perf_counter(), []
        batches = length_grouped_batches(lengths, config.batch_size, rng)
        for batch_ids in tqdm(
            batches, desc=f"{task.name} seed {seed} epoch {epoch}", leave=False, disable=None
        ):
            set_lr(optimizer, config.lr * lr_factor(step / total_steps, config.schedule, config.warmup))
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

        predictions = predict(model, encoded["validation"], task, config, accelerator, pad_token_id)
        validation = score_predictions(task, predictions, task.validation.labels)
        history.append({"epoch": epoch, "train_loss": statistics.fmean(losses), "validation": validation})
        log.info(
            "%s seed %d epoch %d: loss %.4f, validation %s %.4f",
            task.name,
            seed,
            epoch,
            history[-1]["train_loss"],
            "/".join(task.metrics),
            validation["score"],
        )
        # Constant predictions make a correlation NaN: rank that below any real score.
        score = -math.inf if math.isnan(validation["score"]) else validation["score"]
        if best_state is None or score > best_score:
            best_score, best_epoch = score, epoch
            best_state = {
                k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()
            }
        elif epoch - best_epoch >= config.patience:
            break

    accelerator.unwrap_model(model).load_state_dict(best_state)
    scores = {
        name: score_predictions(
            task, predict(model, encoded[name], task, config, accelerator, pad_token_id), split.labels
        )
        for name, split in task.scored.items()
    }
    return {
        "seed": seed,
        "scores": scores,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "train_examples_per_s": examples_seen / train_seconds,
        "history": history,
    }


def predict(
    model, examples: list[dict], task: Task, config: FinetuneConfig, accelerator, pad_token_id: int
) -> list:
    """Class ids (or regression outputs) for `examples`, in their order."""
    import torch

    model.eval()
    lengths = [len(example["input_ids"]) for example in examples]
    predictions = [None] * len(examples)
    with torch.no_grad(), accelerator.autocast():
        for batch_ids in sorted_batches(lengths, config.eval_batch_size):
            batch = collate([examples[i] for i in batch_ids], pad_token_id)
            logits = model(
                **{key: value.to(accelerator.device) for key, value in batch.items()}
            ).logits.float()
            outputs = logits[:, 0] if task.is_regression else logits.argmax(dim=-1)
            for i, value in zip(batch_ids, outputs.tolist(), strict=True):
                predictions[i] = value
    return predictions
