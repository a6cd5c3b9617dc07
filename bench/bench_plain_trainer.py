"""The checkpoint in other people's code (issue 13, item 4): fine-tune an export with plain
`transformers.Trainer` + `AutoModelForSequenceClassification` and nothing of this project, the way the
Hugging Face text-classification tutorial does (dynamic padding with `DataCollatorWithPadding`,
length-grouped batches, evaluation every epoch, the best epoch by validation accuracy restored at the end),
then score the test split.

    python bench/bench_plain_trainer.py --model runs/cram30/final --lr 3e-4 --seeds 3

Prints one line per seed and the median; run `mlm-pretrain finetune` with the same rate, epochs and
seeds for the figure beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", default=str(ROOT.parent / "shared" / "data" / "tasks" / "rt_sentiment"))
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import numpy as np
    import torch
    from datasets import load_dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    torch.set_num_threads(args.threads)
    files = {split: str(Path(args.task) / f"{split}.jsonl") for split in ("train", "validation", "test")}
    data = load_dataset("json", data_files=files)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length), batched=True)

    def accuracy(prediction) -> dict:
        return {
            "accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())
        }

    scores = []
    for seed in range(args.seeds):
        model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
        with tempfile.TemporaryDirectory() as out:
            training = TrainingArguments(
                output_dir=out,
                learning_rate=args.lr,
                num_train_epochs=args.epochs,
                per_device_train_batch_size=32,
                per_device_eval_batch_size=128,
                warmup_steps=0.1,
                weight_decay=0.01,
                eval_strategy="epoch",
                save_strategy="epoch",
                save_total_limit=1,
                load_best_model_at_end=True,
                metric_for_best_model="accuracy",
                train_sampling_strategy="group_by_length",
                report_to=[],
                use_cpu=True,
                seed=seed,
                disable_tqdm=True,
            )
            trainer = Trainer(
                model=model,
                args=training,
                train_dataset=data["train"],
                eval_dataset=data["validation"],
                data_collator=DataCollatorWithPadding(tokenizer),
                compute_metrics=accuracy,
            )
            trainer.train()
            score = trainer.evaluate(data["test"], metric_key_prefix="test")["test_accuracy"]
        scores.append(score)
        print(json.dumps({"seed": seed, "test_accuracy": score}), flush=True)
    summary = {"model": args.model, "lr": args.lr, "epochs": args.epochs, "per_seed": scores}
    print(json.dumps({**summary, "median": statistics.median(scores)}))


if __name__ == "__main__":
    main()
