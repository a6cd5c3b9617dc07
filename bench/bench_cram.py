"""The CPU-cram result: pretrain with recipes/cpu-cram.yaml for N minutes on the shared corpus, fine-tune on
rt_sentiment, and compare test accuracy against the same architecture from random initialisation and
against TF-IDF + logistic regression (median of the seeds for the encoders).

    python bench/bench_cram.py --data ../shared/data --minutes 30 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = str(ROOT.parent / "shared" / "data")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "runs" / "cram"))
    parser.add_argument(
        "--epochs", type=int, default=5, help="fine-tuning epochs (early stopping may cut them)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--lr",
        nargs="+",
        type=float,
        default=[3e-4, 1e-3],
        help="fine-tuning rates; each side keeps its best",
    )
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.out)

    tokenizer = ROOT / "tokenizers" / "shared-wordpiece-16k"
    if not (tokenizer / "tokenizer.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mlm_pretrain",
                "tokenizer",
                "--recipe",
                str(ROOT / "recipes/tokenizer-shared-16k.yaml"),
                f"corpus=[{data / 'corpus'}]",
            ],
            cwd=ROOT,
            check=True,
        )
    final = out / "final"
    if not (final / "model.safetensors").exists():
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mlm_pretrain",
                "pretrain",
                "--recipe",
                str(ROOT / "recipes/cpu-cram.yaml"),
                "--out",
                str(out),
                "--corpus",
                str(data / "corpus"),
                "--validation",
                str(data / "validation" / "corpus_validation.jsonl"),
                f"max_minutes={args.minutes}",
                f"impl.threads={args.threads}",
                "impl.progress=false",
            ],
            cwd=ROOT,
            check=True,
        )
        print(f"pretraining took {(time.perf_counter() - started) / 60:.1f} min wall-clock")

    from mlm_pretrain.finetune import FinetuneConfig, finetune, load_task

    task = load_task(str(data / "tasks" / "rt_sentiment"))
    config = FinetuneConfig(epochs=args.epochs, threads=args.threads, lrs=tuple(args.lr))
    ours = finetune(final, task, out / "finetune-pretrained", seeds=args.seeds, config=config)
    scratch = finetune(
        final,
        task,
        out / "finetune-random-init",
        seeds=args.seeds,
        config=config,
        from_scratch=True,
        baseline=False,
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in records if "eval_loss" in r][-1]
    summary = {
        "steps": last_eval["step"],
        "tokens": [r["tokens"] for r in records if "tokens" in r][-1],
        "eval_loss": last_eval["eval_loss"],
        "eval_accuracy": last_eval["eval_accuracy"],
        "pretrained_test_accuracy": ours["median"]["test"],
        "pretrained_per_seed": [run["scores"]["test"]["score"] for run in ours["seeds"]],
        "random_init_test_accuracy": scratch["median"]["test"],
        "random_init_per_seed": [run["scores"]["test"]["score"] for run in scratch["seeds"]],
        "tfidf_lr_test_accuracy": ours["baseline"]["scores"]["test"]["score"],
    }
    (out / "cram_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
