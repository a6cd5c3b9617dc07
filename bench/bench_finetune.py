"""Fine-tuning throughput and accuracy: `mlm_pretrain.finetune` against HF `Trainer`, two ways.

All sides fine-tune the same randomly initialised BERT (hidden 256, 4 layers, 4 heads, intermediate 1024,
a WordPiece tokenizer trained on the task's train text) on rt_sentiment for the same epochs, batch size,
learning rate, warmup and weight decay. Sides:

ours      `finetune` with one learning rate, no early stop (patience = epochs): pads each batch to its
          longest example, groups similar lengths, and restores the epoch with the best validation
          accuracy (the lower validation loss breaking ties) before scoring test.
careful   HF Trainer as a careful user sets it up: tokenized without padding, `DataCollatorWithPadding`,
          `train_sampling_strategy="group_by_length"` (transformers 5's name for `group_by_length=True`),
          evaluation and a checkpoint every epoch (a temp dir, `save_total_limit=1`) and
          `load_best_model_at_end=True, metric_for_best_model="accuracy"`: the same model selection as
          ours (HF keeps the first epoch on a tie of accuracy).
run_glue  HF Trainer as run_glue.py sets it up by default: `padding="max_length"` (128),
          `default_data_collator`, random order, no evaluation during training, the last epoch scored.

Each run is a child process, so its peak RSS is its own; runs alternate the sides. examples/s counts
training steps only: ours times its batch loop, the HF sides from `on_epoch_begin` to `on_epoch_end` (so
neither the careful side's evaluation and checkpoints nor the Trainer's setup is in it); "wall s" is
the child's whole run. `--train-examples` cuts the train split (validation and test stay whole) when a
full run would take too long.

    python bench/bench_finetune.py --threads 1                       # fp32 and bf16, 1 epoch each
    python bench/bench_finetune.py --precision no --epochs 2 --train-examples 3000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, direction, machine  # noqa: E402

SIDES = ("ours", "careful", "run_glue")
LABELS = {
    "ours": "mlm-pretrain finetune",
    "careful": "HF Trainer, careful (group_by_length, dynamic padding, best epoch)",
    "run_glue": "HF Trainer, run_glue default (pad to 128, last epoch)",
}
SHORT = {"careful": "HF Trainer careful", "run_glue": "HF Trainer run_glue default"}


def build_checkpoint(task_dir: Path, out: Path, vocab_size: int) -> None:
    from mlm_pretrain.models import ModelRecipe, build_model
    from mlm_pretrain.tokenizer import load_tokenizer, train_tokenizer

    texts = [json.loads(line)["text"] for line in (task_dir / "train.jsonl").read_text().splitlines()]
    train_tokenizer(texts, out, vocab_size=vocab_size, progress=False)
    build_model(
        ModelRecipe(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024),
        load_tokenizer(out),
        512,
    ).save_pretrained(out)


def subset_task(task_dir: Path, out: Path, train_examples: int) -> Path:
    """A copy of the task directory whose train split is its first `train_examples` rows."""
    out.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        lines = (task_dir / f"{split}.jsonl").read_text().splitlines(keepends=True)
        (out / f"{split}.jsonl").write_text("".join(lines[:train_examples] if split == "train" else lines))
    return out


def run_ours(args: argparse.Namespace) -> dict:
    from mlm_pretrain.finetune import FinetuneConfig, finetune

    config = FinetuneConfig(
        epochs=args.epochs,
        patience=args.epochs,  # no early stop: the same epochs as the peer
        lrs=(args.lr,),
        batch_size=args.batch_size,
        max_length=args.max_length,
        mixed_precision=args.precision,
    )
    result = finetune(args.model, str(args.task), seeds=1, config=config, baseline=False)
    run = result["seeds"][0]
    return {
        "examples_per_s": run["train_examples_per_s"],
        "test_accuracy": run["scores"]["test"]["accuracy"],
        "best_epoch": run["best_epoch"],
    }


def run_peer(args: argparse.Namespace, careful: bool) -> dict:
    """HF Trainer, `careful` or as run_glue.py sets it up (padding="max_length", default_data_collator)."""
    import datasets
    import numpy as np
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    from mlm_pretrain.finetune.scoring import load_metric

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    splits = ("train", "validation", "test") if careful else ("train", "test")
    raw = datasets.load_dataset(
        "json", data_files={split: str(args.task / f"{split}.jsonl") for split in splits}
    )
    padding = False if careful else "max_length"

    def preprocess(examples):
        return tokenizer(examples["text"], padding=padding, max_length=args.max_length, truncation=True)

    data = raw.map(preprocess, batched=True, remove_columns=["text"])
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    accuracy = load_metric("accuracy")

    def compute_metrics(prediction):
        return accuracy.compute(
            predictions=np.argmax(prediction.predictions, -1), references=prediction.label_ids
        )

    class EpochTimer(TrainerCallback):
        """Seconds spent inside epochs: the training steps, not the evaluation and saving after them."""

        seconds = 0.0

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_epoch_end(self, args, state, control, **kwargs):
            EpochTimer.seconds += time.perf_counter() - self.started

    checkpoints = tempfile.TemporaryDirectory(prefix="bench-finetune-hf-")
    if careful:
        selection = {
            "train_sampling_strategy": "group_by_length",  # transformers < 5: group_by_length=True
            "eval_strategy": "epoch",
            "save_strategy": "epoch",
            "save_total_limit": 1,
            "load_best_model_at_end": True,
            "metric_for_best_model": "accuracy",
        }
    else:
        selection = {"eval_strategy": "no", "save_strategy": "no"}
    training_args = TrainingArguments(
        output_dir=checkpoints.name,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128,
        learning_rate=args.lr,
        warmup_steps=0.1,  # a float is a fraction of the run
        weight_decay=0.01,
        num_train_epochs=args.epochs,
        bf16=args.precision == "bf16",
        use_cpu=True,
        logging_strategy="no",
        report_to=[],
        seed=0,
        disable_tqdm=True,
        **selection,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"] if careful else None,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer) if careful else default_data_collator,
        compute_metrics=compute_metrics if careful else None,
        callbacks=[EpochTimer()],
    )
    metrics = trainer.train().metrics
    best_epoch = args.epochs
    if careful and trainer.state.best_global_step:
        best_epoch = round(trainer.state.best_global_step / trainer.state.max_steps * args.epochs)
    # With group_by_length, transformers 5 orders evaluation and `predict` by length too (a
    # LengthGroupedSampler in `_get_eval_sampler`): the predictions are not in the dataset's order, so score
    # them against the label_ids that came with them, never against data["test"]["label"].
    test = compute_metrics(trainer.predict(data["test"]))
    checkpoints.cleanup()
    return {
        "examples_per_s": len(data["train"]) * args.epochs / EpochTimer.seconds,
        "hf_train_examples_per_s": metrics["train_samples_per_second"],  # the whole train() call
        "test_accuracy": test["accuracy"],
        "best_epoch": best_epoch,
    }


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    figures = run_ours(args) if args.child == "ours" else run_peer(args, careful=args.child == "careful")
    figures["wall_s"] = time.perf_counter() - started
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(figures), flush=True)


def spawn(which: str, precision: str, args: argparse.Namespace, model: Path, task: Path) -> dict:
    command = [sys.executable, __file__, "--child", which, "--precision", precision, "--model", str(model)]
    command += ["--task", str(task)]
    for name in ("data", "epochs", "lr", "batch_size", "max_length", "threads"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        sys.exit(f"{which} {precision} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data", help="the shared data dir"
    )
    parser.add_argument("--precision", choices=("no", "bf16", "both"), default="both")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each; medians reported")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=12000)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each run")
    parser.add_argument("--train-examples", type=int, default=0, help="train on the first N rows (0: all)")
    parser.add_argument("--sides", default=",".join(SIDES), help="ours is always run (the ratios need it)")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--task", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    task = args.data / "tasks" / "rt_sentiment"
    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    model = work / "bert_4x256"
    build_checkpoint(task, model, args.vocab_size)  # the tokenizer sees the whole train split
    if args.train_examples:
        task = subset_task(task, work / "rt_sentiment", args.train_examples)
    sides = ["ours", *(side for side in args.sides.split(",") if side != "ours")]
    rows = sum(1 for _ in (task / "train.jsonl").open())
    print(machine())
    print(
        f"{task}: {rows} train rows, BERT 4x256, {args.epochs} epoch(s), batch {args.batch_size}, "
        f"lr {args.lr:g}, {args.threads} thread(s), medians of {args.repeats} run(s)"
    )
    print(
        "| precision | run | examples/s | test accuracy | best epoch | peak RSS MB | wall s |\n"
        "|---|---|---|---|---|---|---|"
    )
    ratios = []
    for precision in ("no", "bf16") if args.precision == "both" else (args.precision,):
        runs = {which: [] for which in sides}
        for repeat in range(args.repeats):
            for which in sides if repeat % 2 == 0 else sides[::-1]:
                runs[which].append(spawn(which, precision, args, model, task))
        medians = {
            which: {key: statistics.median(r[key] for r in results) for key in results[0]}
            for which, results in runs.items()
        }
        for which in sides:
            m = medians[which]
            print(
                f"| {precision} | {LABELS[which]} | {m['examples_per_s']:.1f} | {m['test_accuracy']:.4f} | "
                f"{m['best_epoch']:.0f} | {m['peak_rss_mb']:.0f} | {m['wall_s']:.0f} |",
                flush=True,
            )
        for which in sides[1:]:
            ratio = medians["ours"]["examples_per_s"] / medians[which]["examples_per_s"]
            ratios.append(f"{precision}: {direction(ratio, SHORT[which])} (examples/s ratio {ratio:.2f})")
    print("\n".join(ratios))


if __name__ == "__main__":
    main()
