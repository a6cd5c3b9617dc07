"""Fine-tuning: `mlm_pretrain.finetune` against HF `Trainer` (`bench.peers.hf_finetune`), examples/s and test
accuracy; and, given an export (`--model`), how it fine-tunes in plain `Trainer` with nothing of ours.

By default every side fine-tunes the same randomly initialised BERT (hidden 256, 4 layers, 4 heads,
intermediate 1024, a WordPiece tokenizer trained on the task's train text) on rt_sentiment for the same
epochs, batch size, learning rate, warmup and weight decay. Sides:

ours      `finetune` with one learning rate, no early stop (patience = epochs): pads each batch to its
          longest example, groups similar lengths, and restores the epoch with the best validation
          accuracy (the lower validation loss breaking ties) before scoring test.
careful   HF Trainer as the HF text-classification tutorial sets it up: dynamic padding, length-grouped
          batches, evaluation every epoch, the best epoch restored: the same model selection as ours.
run_glue  HF Trainer as run_glue.py sets it up by default: padding to `--max-length`, random order, no
          evaluation during training, the last epoch scored.

Each side is a child process (its peak RSS is its own) that runs every seed of `--seeds`; medians over the
seeds are reported. examples/s counts training steps only (ours times its batch loop, the HF sides from
`on_epoch_begin` to `on_epoch_end`); "wall s" is the child's whole run. `--train-examples` cuts the train
split (validation and test stay whole).

    python -m bench.finetune_speed --threads 1                      # fp32 and bf16, 1 epoch each
    python -m bench.finetune_speed --precision no --epochs 2 --train-examples 3000
    python -m bench.finetune_speed --model runs/cram30/final --sides careful --precision no \\
        --lr 3e-4 --epochs 3 --seeds 3 --max-length 64           # our export in plain Trainer
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.measure import machine
from bench.sides import DEFAULT_DATA, direction, report, run_side, smoke_data

SIDES = ("ours", "careful", "run_glue")
LABELS = {
    "ours": "mlm-pretrain finetune",
    "careful": "HF Trainer, careful (group_by_length, dynamic padding, best epoch)",
    "run_glue": "HF Trainer, run_glue default (pad to max length, last epoch)",
}


def build_checkpoint(task_dir: Path, out: Path, vocab_size: int, layers: int, hidden: int) -> None:
    """A random BERT (LAYERS x HIDDEN, heads H/64, intermediate 4H) and a WordPiece trained on the task."""
    from mlm_pretrain.models import build_model
    from mlm_pretrain.schema import ModelRecipe
    from mlm_pretrain.tokenizer import load_tokenizer, train_tokenizer

    texts = [json.loads(line)["text"] for line in (task_dir / "train.jsonl").read_text().splitlines()]
    train_tokenizer(texts, out, vocab_size=vocab_size, min_frequency=1, progress=False)
    recipe = ModelRecipe(
        hidden_size=hidden, num_layers=layers, num_heads=max(hidden // 64, 2), intermediate_size=4 * hidden
    )
    build_model(recipe, load_tokenizer(out), 512).save_pretrained(out)


def subset_task(task_dir: Path, out: Path, train_examples: int) -> Path:
    """A copy of the task directory whose train split is its first `train_examples` rows."""
    out.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        lines = (task_dir / f"{split}.jsonl").read_text().splitlines(keepends=True)
        (out / f"{split}.jsonl").write_text("".join(lines[:train_examples] if split == "train" else lines))
    return out


def side(args: argparse.Namespace) -> dict:
    """One side, every seed: medians of examples/s, test accuracy and best epoch, and the per-seed scores."""
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.side == "ours":
        from mlm_pretrain.finetune import FinetuneConfig, finetune

        config = FinetuneConfig(
            epochs=args.epochs,
            patience=args.epochs,  # no early stop: the same epochs as the peer
            lrs=(args.lr,),
            batch_size=args.batch_size,
            max_length=args.max_length,
            mixed_precision=args.precision,
        )
        result = finetune(args.model, str(args.task), seeds=args.seeds, config=config, baseline=False)
        runs = [
            {
                "examples_per_s": run["train_examples_per_s"],
                "test_accuracy": run["scores"]["test"]["accuracy"],
                "best_epoch": run["best_epoch"],
            }
            for run in result["seeds"]
        ]
    else:
        from bench.peers import hf_finetune

        runs = [
            hf_finetune(
                args.model, args.task, careful=args.side == "careful", lr=args.lr, epochs=args.epochs,
                batch_size=args.batch_size, max_length=args.max_length, precision=args.precision, seed=seed,
            )
            for seed in range(args.seeds)
        ]  # fmt: skip
    medians = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    return {
        **medians,
        "per_seed": [run["test_accuracy"] for run in runs],
        "wall_s": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=DEFAULT_DATA, help="the shared data dir (its tasks/<--task-name>)")
    parser.add_argument("--task-name", default="rt_sentiment")
    parser.add_argument(
        "--model", help="fine-tune this export [a random 4x256 BERT with the task's WordPiece]"
    )
    parser.add_argument("--precision", choices=("no", "bf16", "both"), default="both")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=1, help="seeds of each side; medians reported")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=12000)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each run")
    parser.add_argument("--train-examples", type=int, default=0, help="train on the first N rows (0: all)")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument(
        "--smoke", action="store_true", help="a 2x32 model on the tests' task sample, seconds"
    )
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--task", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        return report(side(args))

    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # the checkpoint and the task subset
    shape = (4, 256)
    if args.smoke:
        args.data, shape, args.vocab_size = smoke_data(), (2, 32), 500
        args.precision, args.max_length, args.threads = "no", 32, 1
    task = Path(args.data) / "tasks" / args.task_name
    model = args.model or str(work / "bert")
    if not args.model:
        build_checkpoint(
            task, Path(model), args.vocab_size, *shape
        )  # the tokenizer sees the whole train split
    if args.train_examples:
        task = subset_task(task, work / args.task_name, args.train_examples)
    sides = args.sides.split(",")
    rows = sum(1 for _ in (task / "train.jsonl").open())
    print(machine())
    print(
        f"{task}: {rows} train rows, {model}, {args.epochs} epoch(s), batch {args.batch_size}, "
        f"lr {args.lr:g}, {args.threads} thread(s), medians of {args.seeds} seed(s)"
    )
    print(
        "| precision | run | examples/s | test accuracy | per seed | best epoch | peak RSS MB | wall s |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    ratios = []
    for precision in ("no", "bf16") if args.precision == "both" else (args.precision,):
        forwarded = ["--model", model, "--task", str(task), "--precision", precision]
        for name in ("epochs", "seeds", "lr", "batch_size", "max_length", "threads"):
            forwarded += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        results = {which: run_side("finetune_speed", which, forwarded, inline=args.smoke) for which in sides}
        for which, r in results.items():
            per_seed = ", ".join(f"{score:.4f}" for score in r["per_seed"])
            print(
                f"| {precision} | {LABELS[which]} | {r['examples_per_s']:.1f} | {r['test_accuracy']:.4f} | "
                f"{per_seed} | {r['best_epoch']:.0f} | {r['rss_mb']} | {r['wall_s']:.0f} |",
                flush=True,
            )
        for which in [s for s in sides if s != "ours" and "ours" in sides]:
            ratio = results["ours"]["examples_per_s"] / results[which]["examples_per_s"]
            ratios.append(f"{precision}: {direction(ratio, which)} (examples/s ratio {ratio:.2f})")
    print("\n".join(ratios))


if __name__ == "__main__":
    main()
