"""Equal wall time against the Hugging Face path (issue 13, item 2): validation MLM loss after N minutes.

Ours: the `recipes/cpu-cram.yaml` runs made for the fine-tuning evidence (`--ours MINUTES=RUN_DIR`, each a
run with its own `max_minutes` budget, the clock counting start-up, evaluations and checkpoints).
The peer: the `run_mlm.py` path as its users run it: the corpus files through `datasets` ("text" / "json"),
tokenized with `map(batched=True)`, concatenated into 128-token blocks (`group_texts`),
`DataCollatorForLanguageModeling(mlm_probability=0.15)`, `Trainer`, the same architecture (our export's
`config.json`, freshly initialised), tokenizer, batch 64, AdamW betas (0.9, 0.98), weight decay 0.01, 5%
warmup then linear decay, at each learning rate of `--lrs` for the first budget; later budgets use the rate
that was best at the first. Its clock starts with the process, preprocessing included. So that its
schedule ends when its time does, `max_steps` comes from a timing of 6 steps made before the clock starts
(what a careful user learns from a trial run); a callback stops it at the deadline in any case.

One evaluator scores every export: the trainer's own `evaluate` (the shared validation text, 128-token
blocks, mask rate 0.15 with fixed masks, 512 blocks), loss per masked token and masked-token accuracy.
Each result is written to `<out>/results.json` as it comes; a rerun skips what is done.

    python bench/bench_wall_time.py --ours 10=runs/cram10 30=runs/cram30 --minutes 10 30 --lrs 5e-4 1e-3

or side by side, one pinned core each (both sides under the same load), then score both:

    taskset -c 0 mlm-pretrain pretrain --recipe recipes/cpu-cram.yaml --out runs/cram10-1core \
        max_minutes=10 impl.threads=1 &
    taskset -c 1 python bench/bench_wall_time.py --side hf --minutes-one 10 --lr 5e-4 --threads 1 \
        --run runs/wall-time/hf-10min-lr0.0005 --config runs/cram10/final/config.json; wait
    python bench/bench_wall_time.py --ours 10=runs/cram10-1core --minutes 10 --lrs 5e-4 --threads 1

`--score EXPORT ...` only scores exports, on the validation text and evaluation settings of
`--score-recipe` (e.g. recipes/continue-on-task.yaml: the task's own validation sentences).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_DATA, ROOT, machine  # noqa: E402

TOKENIZER = ROOT / "tokenizers" / "shared-wordpiece-16k"
CRAM = ROOT / "recipes" / "cpu-cram.yaml"


def hf_side(args: argparse.Namespace) -> None:
    """One HF Trainer run of `args.minutes` at `args.lr`, exported to `<args.run>/final`."""
    started = time.monotonic()
    deadline = started + args.minutes * 60
    import datasets
    import torch
    from datasets import concatenate_datasets, load_dataset
    from transformers import (
        AutoConfig,
        AutoModelForMaskedLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    corpus = Path(args.data) / "corpus"
    parts = []
    for path in sorted(corpus.iterdir()):
        kind = "json" if ".jsonl" in path.name else "text"
        part = load_dataset(kind, data_files=str(path), split="train")
        parts.append(part.select_columns(["text"]))
    raw = concatenate_datasets(parts)
    tokenized = raw.map(
        lambda batch: tokenizer(batch["text"], return_special_tokens_mask=True),
        batched=True,
        remove_columns=["text"],
    )

    def group_texts(examples: dict) -> dict:
        concatenated = {k: sum(examples[k], []) for k in examples}
        total = len(concatenated["input_ids"]) // args.seq_len * args.seq_len
        return {
            k: [t[i : i + args.seq_len] for i in range(0, total, args.seq_len)]
            for k, t in concatenated.items()
        }

    blocks = tokenized.map(group_texts, batched=True)
    config = AutoConfig.from_pretrained(args.config)
    torch.manual_seed(0)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)

    # The trial: 6 steps of a throwaway model, the last 4 timed, outside the clock.
    trial_started = time.monotonic()
    trial = AutoModelForMaskedLM.from_config(config)
    optimizer = torch.optim.AdamW(trial.parameters(), lr=args.lr)
    batch = collator([blocks[i] for i in range(64)])
    for i in range(6):
        if i == 2:
            tick = time.monotonic()
        trial(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    per_step = (time.monotonic() - tick) / 4
    del trial, optimizer
    trial_seconds = time.monotonic() - trial_started
    deadline += trial_seconds
    preprocessing_seconds = trial_started - started
    max_steps = max(1, int((deadline - time.monotonic()) / per_step))

    class Deadline(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if time.monotonic() >= deadline:
                control.should_training_stop = True

    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(config)
    training = TrainingArguments(
        output_dir=str(Path(args.run) / "trainer"),
        per_device_train_batch_size=64,
        learning_rate=args.lr,
        weight_decay=0.01,
        adam_beta2=0.98,
        lr_scheduler_type="linear",
        warmup_steps=max(1, int(0.05 * max_steps)),
        max_steps=max_steps,
        max_grad_norm=1.0,
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=blocks,
        data_collator=collator,
        callbacks=[Deadline()],
    )
    trained = trainer.train()
    steps = trained.global_step
    seconds = time.monotonic() - started - trial_seconds
    trainer.save_model(str(Path(args.run) / "final"))
    tokenizer.save_pretrained(str(Path(args.run) / "final"))
    figures = {
        "steps": steps,
        "planned_steps": max_steps,
        "tokens": steps * 64 * args.seq_len,
        "seconds": seconds,
        "trial_seconds_per_step": per_step,
        "preprocessing_seconds": preprocessing_seconds,
    }
    (Path(args.run) / "hf_result.json").write_text(json.dumps(figures, indent=2) + "\n")


def score(export: Path, recipe_path: Path, overrides: list[str] = ()) -> dict:
    """The trainer's own evaluator on an export, with the validation text and evaluation settings of a
    recipe (fixed evaluation masks at `mlm.eval_mask_rate`)."""
    from accelerate import Accelerator
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from mlm_pretrain.objectives.mlm import SparseMLM
    from mlm_pretrain.packing import TokenInfo
    from mlm_pretrain.recipe import load_recipe
    from mlm_pretrain.trainer import PretrainRecipe, evaluate

    recipe = load_recipe(PretrainRecipe, recipe_path, list(overrides))
    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForMaskedLM.from_pretrained(export, attn_implementation="sdpa")
    return evaluate(SparseMLM(model), recipe, tokenizer, TokenInfo(tokenizer), Accelerator(cpu=True))


def score_on_corpus_validation(export: Path, data: Path) -> dict:
    """Both sides' one evaluator: the shared validation text, mask 0.15, 512 blocks."""
    validation = data / "validation" / "corpus_validation.jsonl"
    return score(export, CRAM, [f"data.validation=[{validation}]", "impl.eval_blocks=512"])


def ours_figures(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens" in r]
    return {"steps": steps[-1]["step"], "tokens": steps[-1]["tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--ours", nargs="+", default=[], help="MINUTES=RUN_DIR of our cram runs")
    parser.add_argument("--minutes", nargs="+", type=float, default=[10.0, 30.0])
    parser.add_argument("--lrs", nargs="+", type=float, default=[5e-4, 1e-3])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "runs" / "wall-time"))
    parser.add_argument(
        "--score",
        nargs="+",
        metavar="EXPORT",
        help="only score these exports, on --score-recipe's validation",
    )
    parser.add_argument("--score-recipe", default=str(CRAM))
    parser.add_argument("--side", choices=["hf"], help=argparse.SUPPRESS)
    parser.add_argument("--minutes-one", dest="one", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.score:
        for export in args.score:
            print(export, json.dumps(score(Path(export), Path(args.score_recipe))))
        return
    if args.side == "hf":
        args.minutes = args.one
        hf_side(args)
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def record(name: str, figures: dict) -> None:
        results[name] = figures
        results_path.write_text(json.dumps(results, indent=2) + "\n")

    ours = {float(m): Path(d) for m, d in (item.split("=", 1) for item in args.ours)}
    config = next(iter(ours.values())) / "final" / "config.json"
    for minutes, run in sorted(ours.items()):
        name = f"ours {minutes:g} min"
        if name not in results and (run / "final" / "model.safetensors").exists():
            record(
                name,
                {
                    "minutes": minutes,
                    **ours_figures(run),
                    **score_on_corpus_validation(run / "final", Path(args.data)),
                },
            )

    for index, minutes in enumerate(args.minutes):
        if index == 0:
            lrs = args.lrs
        else:
            first = [v for v in results.values() if v.get("side") == "hf" and v["minutes"] == args.minutes[0]]
            lrs = [min(first, key=lambda v: v["eval_loss"])["lr"]]
        for lr in lrs:
            name = f"hf {minutes:g} min lr {lr:g}"
            if name in results:
                continue
            run = out / f"hf-{minutes:g}min-lr{lr:g}"
            if not (run / "hf_result.json").exists():  # or run apart, beside ours, with --side hf
                print(f"{machine()}\n{name} ...", flush=True)
                side = subprocess.run(
                    [sys.executable, __file__, "--side", "hf", "--minutes-one", str(minutes), "--lr", str(lr),
                     "--run", str(run), "--config", str(config), "--data", args.data,
                     "--threads", str(args.threads), "--seq-len", str(args.seq_len)],
                    capture_output=True, text=True, check=False,
                )  # fmt: skip
                if side.returncode != 0:
                    sys.exit(f"{name} failed:\n{side.stderr[-3000:]}")
            figures = json.loads((run / "hf_result.json").read_text())
            record(
                name,
                {
                    "side": "hf",
                    "minutes": minutes,
                    "lr": lr,
                    **figures,
                    **score_on_corpus_validation(run / "final", Path(args.data)),
                },
            )

    print(machine())
    print("| run | steps | tokens | validation loss / masked token | masked accuracy |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['steps']} | {r['tokens']:,} | {r['eval_loss']:.3f} "
            f"| {100 * r['eval_accuracy']:.1f}% |"
        )


if __name__ == "__main__":
    main()
