"""`mlm-pretrain pretrain`: train an encoder from scratch on a streamed corpus, as a recipe says."""

from __future__ import annotations

import argparse

import yaml

from mlm_pretrain.cli.common import add_corpus_args, corpus_overrides


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain a BERT/RoBERTa/ModernBERT encoder (masked tokens) or word vectors (skip-gram, CBOW)",
        description="Pretrain an encoder from scratch on a streamed corpus, as the recipe says; flags and "
        "key=value overrides (dotted, e.g. optim.lr=5e-4, or a unique key name, e.g. mask_rate=0.3) change "
        "it. The run directory (--out) gets checkpoints/, metrics.jsonl, TensorBoard logs, loss_curve.png "
        "and, at the end, final/: a Hugging Face model directory with a model card. Ctrl-C saves a "
        "checkpoint and stops; SIGTERM or SIGUSR1 does too and exits with 75 (requeue); --resume "
        "continues from the newest checkpoint. Works under torchrun, `accelerate launch` and SLURM "
        "(README: Scaling out).",
    )
    p.add_argument("--recipe", help="YAML recipe (see recipes/); default: the tiny recipe in the package")
    add_corpus_args(p)
    p.add_argument("--validation", nargs="+", metavar="PATH", help="held-out text for evaluation")
    p.add_argument("--tokenizer", help="tokenizer directory (from `mlm-pretrain tokenizer`)")
    p.add_argument("--out", help="run directory")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest verified checkpoint in --out, or start fresh if it holds none "
        "(safe to repeat: a requeued job reruns the same command); refused if --out holds another recipe",
    )
    p.add_argument(
        "--log-with",
        nargs="+",
        metavar="TRACKER",
        help="experiment trackers: tensorboard (the default), mlflow, wandb, trackio, or several; "
        'mlflow, wandb and trackio need their extra: pip install "mlm-pretrain[mlflow]" (and so on)',
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mlm_pretrain.launch import accelerate_cpu_launch, relaunch

    launch = accelerate_cpu_launch()
    if launch is not None:
        return relaunch(launch)
    from mlm_pretrain.recipe import load_recipe
    from mlm_pretrain.schema import PretrainRecipe
    from mlm_pretrain.trainer import pretrain

    flags = {
        "data.validation": args.validation,
        "data.tokenizer": args.tokenizer,
        "impl.out": args.out,
        "max_steps": args.max_steps,
        "impl.resume": True if args.resume else None,
        "impl.log_with": args.log_with and yaml.safe_dump(args.log_with, default_flow_style=True).strip(),
    }
    overrides = [
        *corpus_overrides(args, prefix="data."),
        *(f"{k}={v}" for k, v in flags.items() if v is not None),
        *args.overrides,
    ]
    from mlm_pretrain.corpus import PACKAGE_DATA

    recipe = load_recipe(PretrainRecipe, args.recipe or PACKAGE_DATA / "recipes" / "tiny.yaml", overrides)
    metrics = pretrain(recipe)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        print(f"model saved to {recipe.impl.out}/final")
    return 0
