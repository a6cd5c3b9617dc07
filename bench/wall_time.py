"""Equal wall time against the Hugging Face path: validation MLM loss after N minutes.

Ours: `recipes/cpu-cram.yaml` runs (`--ours MINUTES=RUN_DIR`, each a run with its own `max_minutes` budget,
the clock counting start-up, evaluations and checkpoints). The peer: the `run_mlm.py` path as its users run
it (`bench.peers`): the corpus files through its `datasets` preprocessing into 128-token blocks, its
`Trainer`, the same architecture (our export's `config.json`, freshly initialised), tokenizer, batch 64,
AdamW betas (0.9, 0.98), weight decay 0.01, 5% warmup then linear decay, at each learning rate of `--lrs`
for the first budget; later budgets use the rate that was best at the first. Its clock starts with the
process, preprocessing included. So that its schedule ends when its time does, `max_steps` comes from a
timing of 6 steps made before the clock starts (what a careful user learns from a trial run); a callback
stops it at the deadline in any case.

One evaluator scores every export: the trainer's own `evaluate` (the shared validation text, 128-token
blocks, mask rate 0.15 with fixed masks, 512 blocks), loss per masked token and masked-token accuracy.
Each result is written to `<out>/results.json` as it comes; a rerun skips what is done.

    python -m bench.wall_time --ours 10=runs/cram10 30=runs/cram30 --minutes 10 30 --lrs 5e-4 1e-3

or side by side, one pinned core each (both sides under the same load), then score both:

    taskset -c 0 mlm-pretrain pretrain --recipe recipes/cpu-cram.yaml --out runs/cram10-1core \\
        max_minutes=10 impl.threads=1 &
    taskset -c 1 python -m bench.wall_time --side hf --minutes-one 10 --lr 5e-4 --threads 1 \\
        --run runs/wall-time/hf-10min-lr0.0005 --config runs/cram10/final/config.json; wait
    python -m bench.wall_time --ours 10=runs/cram10-1core --minutes 10 --lrs 5e-4 --threads 1

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

from bench.measure import Clock, machine
from bench.sides import DEFAULT_DATA, ROOT, SMOKE_CRAM, mlm_pretrain, smoke_data

CRAM = ROOT / "recipes" / "cpu-cram.yaml"


def hf_side(args: argparse.Namespace) -> None:
    """One HF Trainer run of `args.minutes` at `args.lr`, exported to `<args.run>/final`."""
    started = time.monotonic()
    deadline = started + args.minutes * 60
    import datasets
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer, TrainerCallback

    from bench.peers import mlm_trainer, run_mlm_preprocessing

    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    _, blocks = run_mlm_preprocessing(Path(args.data) / "corpus", tokenizer, args.seq_len, None)
    config = AutoConfig.from_pretrained(args.config)
    optim = {
        "lr": args.lr,
        "warmup": 0.05,
        "weight_decay": 0.01,
        "betas": (0.9, 0.98),
        "eps": 1e-8,
        "clip": 1.0,
    }

    # The trial: 6 steps of a throwaway model, the last 4 timed, outside the clock.
    trial_started, clock = time.monotonic(), Clock()
    trial = mlm_trainer(
        AutoModelForMaskedLM.from_config(config), tokenizer, blocks, Path(args.run) / "trial",
        batch_size=args.batch, max_steps=6, optim=optim, logging_steps=1, clock=clock,
    )  # fmt: skip
    trial.train()
    per_step = (clock.wall[6] - clock.wall[2]) / 4
    del trial
    trial_seconds = time.monotonic() - trial_started
    deadline += trial_seconds
    preprocessing_seconds = trial_started - started
    max_steps = max(1, int((deadline - time.monotonic()) / per_step))

    class Deadline(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if time.monotonic() >= deadline:
                control.should_training_stop = True

    torch.manual_seed(0)
    trainer = mlm_trainer(
        AutoModelForMaskedLM.from_config(config), tokenizer, blocks, Path(args.run) / "trainer",
        batch_size=args.batch, max_steps=max_steps, optim=optim, logging_steps=50, callbacks=[Deadline()],
    )  # fmt: skip
    steps = trainer.train().global_step
    seconds = time.monotonic() - started - trial_seconds
    trainer.save_model(str(Path(args.run) / "final"))
    tokenizer.save_pretrained(str(Path(args.run) / "final"))
    figures = {
        "steps": steps,
        "planned_steps": max_steps,
        "tokens": steps * args.batch * args.seq_len,
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
    from mlm_pretrain.schema import PretrainRecipe
    from mlm_pretrain.trainer import evaluate

    recipe = load_recipe(PretrainRecipe, recipe_path, list(overrides))
    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForMaskedLM.from_pretrained(export, attn_implementation="sdpa")
    return evaluate(SparseMLM(model), recipe, tokenizer, TokenInfo(tokenizer), Accelerator(cpu=True))


def score_on_corpus_validation(export: Path, data: Path, blocks: int) -> dict:
    """Both sides' one evaluator: the shared validation text, mask 0.15, `blocks` blocks."""
    validation = data / "validation" / "corpus_validation.jsonl"
    return score(export, CRAM, [f"data.validation=[{validation}]", f"impl.eval_blocks={blocks}"])


def ours_figures(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens" in r]
    return {"steps": steps[-1]["step"], "tokens": steps[-1]["tokens"]}


def smoke_run(data: Path, out: Path) -> Path:
    """A 4-step cram run of a 2x64 model on the smoke data: the `--ours` run of a smoke test."""
    run = out / "cram-smoke"
    overrides = [
        f"data.corpus=['{data / 'corpus'}']",
        f"data.validation=['{data / 'validation'}']",
        *SMOKE_CRAM,
        "max_minutes=null",
        "max_steps=4",
        "impl.log_every=1",
        f"impl.out={run}",
    ]
    if mlm_pretrain(["pretrain", "--recipe", str(CRAM), *overrides], inline=True) != 0:
        sys.exit("the smoke run of mlm-pretrain pretrain failed")
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--ours", nargs="+", default=[], help="MINUTES=RUN_DIR of our cram runs")
    parser.add_argument("--minutes", nargs="+", type=float, default=[10.0, 30.0])
    parser.add_argument("--lrs", nargs="+", type=float, default=[5e-4, 1e-3])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64, help="the peer's blocks per step")
    parser.add_argument("--tokenizer", default=str(ROOT / "tokenizers" / "shared-wordpiece-16k"))
    parser.add_argument(
        "--eval-blocks", type=int, default=512, help="validation blocks every export is scored on"
    )
    parser.add_argument("--out", default=str(ROOT / "runs" / "wall-time"))
    parser.add_argument(
        "--score",
        nargs="+",
        metavar="EXPORT",
        help="only score these exports, on --score-recipe's validation",
    )
    parser.add_argument("--score-recipe", default=str(CRAM))
    parser.add_argument("--smoke", action="store_true", help="a 4-step run of ours, 3 s of the peer; seconds")
    parser.add_argument("--side", choices=["hf"], help=argparse.SUPPRESS)
    parser.add_argument("--minutes-one", dest="one", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.score:
        for export in args.score:
            print(export, json.dumps(score(Path(export), Path(args.score_recipe))))
        return
    if args.side == "hf":
        args.minutes = args.one
        hf_side(args)
        return
    if args.smoke:
        args.data = str(smoke_data())
        args.out = str(Path(args.data) / "wall-time")
        args.tokenizer = str(ROOT / "tokenizers" / "default-wordpiece-8k")
        args.ours = [f"0.05={smoke_run(Path(args.data), Path(args.out))}"]
        args.minutes, args.lrs, args.eval_blocks, args.batch = [0.05], [1e-3], 8, 8

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
            scores = score_on_corpus_validation(run / "final", Path(args.data), args.eval_blocks)
            record(name, {"minutes": minutes, **ours_figures(run), **scores})

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
                hf_argv = [
                    "--side", "hf", "--minutes-one", str(minutes), "--lr", str(lr), "--run", str(run),
                    "--config", str(config), "--data", args.data, "--threads", str(args.threads),
                    "--seq-len", str(args.seq_len), "--tokenizer", args.tokenizer, "--batch", str(args.batch),
                ]  # fmt: skip
                if args.smoke:  # the same side in this process: one interpreter start less
                    main(hf_argv)
                else:
                    command = [sys.executable, "-m", "bench.wall_time", *hf_argv]
                    side = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
                    if side.returncode != 0:
                        sys.exit(f"{name} failed:\n{side.stderr[-3000:]}")
            figures = json.loads((run / "hf_result.json").read_text())
            scores = score_on_corpus_validation(run / "final", Path(args.data), args.eval_blocks)
            record(name, {"side": "hf", "minutes": minutes, "lr": lr, **figures, **scores})

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
