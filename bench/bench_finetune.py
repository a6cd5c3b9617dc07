"""Fine-tuning throughput and accuracy: `mlm_pretrain.finetune` against HF `Trainer` set up as `run_glue.py`.

Both fine-tune the same randomly initialised BERT (hidden 256, 4 layers, 4 heads, intermediate 1024,
a WordPiece tokenizer trained on the task's train text) on rt_sentiment for the same epochs, batch size,
learning rate and warmup. The peer pads every example to max_length 128, as run_glue.py does by default;
ours pads each batch to its longest example and groups similar lengths. Each run is a child process, so
its peak RSS is its own; runs alternate ours / peer. Throughput counts training steps only (no evaluation).

    python bench/bench_finetune.py                      # fp32 and bf16, 1 epoch each
    python bench/bench_finetune.py --precision no --epochs 2
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

ROOT = Path(__file__).resolve().parents[1]


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
    return {"examples_per_s": run["train_examples_per_s"], "test_accuracy": run["scores"]["test"]["accuracy"]}


def run_peer(args: argparse.Namespace) -> dict:
    """HF Trainer as run_glue.py sets it up: padding="max_length", default_data_collator."""
    import datasets
    import numpy as np
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    from mlm_pretrain.finetune.scoring import load_metric

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    raw = datasets.load_dataset(
        "json", data_files={split: str(args.task / f"{split}.jsonl") for split in ("train", "test")}
    )

    def preprocess(examples):
        return tokenizer(examples["text"], padding="max_length", max_length=args.max_length, truncation=True)

    data = raw.map(preprocess, batched=True, remove_columns=["text"])
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128,
        learning_rate=args.lr,
        warmup_steps=0.1,  # a float is a fraction of the run
        weight_decay=0.01,
        num_train_epochs=args.epochs,
        bf16=args.precision == "bf16",
        use_cpu=True,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=data["train"], data_collator=default_data_collator
    )
    metrics = trainer.train().metrics
    logits = trainer.predict(data["test"]).predictions
    accuracy = load_metric("accuracy").compute(
        predictions=np.argmax(logits, -1), references=data["test"]["label"]
    )
    return {"examples_per_s": metrics["train_samples_per_second"], "test_accuracy": accuracy["accuracy"]}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    figures = run_ours(args) if args.child == "ours" else run_peer(args)
    figures["wall_s"] = time.perf_counter() - started
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(figures), flush=True)


def spawn(which: str, precision: str, args: argparse.Namespace, model: Path) -> dict:
    command = [sys.executable, __file__, "--child", which, "--precision", precision, "--model", str(model)]
    for name in ("data", "epochs", "lr", "batch_size", "max_length", "threads"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        sys.exit(f"{which} {precision} failed:\n{out.stderr[-3000:]}")
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
    parser.add_argument("--child", choices=("ours", "peer"), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.task = args.data / "tasks" / "rt_sentiment"
    if args.child:
        return child(args)

    model = Path(tempfile.mkdtemp()) / "bert_4x256"
    build_checkpoint(args.task, model, args.vocab_size)
    print(
        f"rt_sentiment, BERT 4x256, {args.epochs} epoch(s), batch {args.batch_size}, {args.threads} thread(s)"
    )
    print(
        "| precision | run | examples/s | test accuracy | peak RSS MB | wall s |\n|---|---|---|---|---|---|"
    )
    for precision in ("no", "bf16") if args.precision == "both" else (args.precision,):
        runs = {"ours": [], "peer": []}
        for _ in range(args.repeats):
            for which in ("ours", "peer"):
                runs[which].append(spawn(which, precision, args, model))
        medians = {
            which: {key: statistics.median(r[key] for r in results) for key in results[0]}
            for which, results in runs.items()
        }
        for which, label in (("ours", "mlm-pretrain finetune"), ("peer", "HF Trainer (run_glue setup)")):
            m = medians[which]
            print(
                f"| {precision} | {label} | {m['examples_per_s']:.1f} | {m['test_accuracy']:.4f} | "
                f"{m['peak_rss_mb']:.0f} | {m['wall_s']:.0f} |"
            )
        ratio = medians["ours"]["examples_per_s"] / medians["peer"]["examples_per_s"]
        print(f"| {precision} | **ratio ours/peer** | **{ratio:.2f}x** | | | |")


if __name__ == "__main__":
    main()
