"""`mlm-pretrain demo`: the whole mission on the sample corpus shipped in the package, offline."""

from __future__ import annotations

import argparse
from pathlib import Path

from mlm_pretrain.cli.common import require_at_least_one

DEFAULT_TOKENS = 3_000_000


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the pipeline end to end on the shipped sample corpus: tokenizer, pretraining, fine-tuning",
        description="Train a WordPiece tokenizer on the sample corpus shipped in the package (Austen and "
        "Moby Dick, public domain), pretrain a tiny encoder (the tiny recipe: 2 layers, 64 wide) on it for a "
        "budget of tokens, export the checkpoint, fine-tune it on the shipped Rotten Tomatoes sentiment "
        "sample, and print a table: our checkpoint against the same architecture from random "
        "initialisation and against TF-IDF + logistic regression, with each encoder's seed range and a line "
        "saying whether the difference is beyond the seed spread. Both encoders are fine-tuned by the same "
        "procedure: every learning rate of --lr with every seed, each keeping the rate with its best median "
        "validation score. Offline, CPU, about 8 minutes on 2 cores.",
    )
    p.add_argument("--out", default="runs/demo", help="directory for everything the demo writes")
    p.add_argument(
        "--tokens",
        type=int,
        default=DEFAULT_TOKENS,
        help=f"pretraining budget in tokens (default {DEFAULT_TOKENS:,}: 2-3 minutes on one core; a "
        "budget in tokens, not minutes, trains as much on a busy machine as on a quiet one)",
    )
    p.add_argument(
        "--model-type",
        choices=["bert", "modernbert"],
        default="modernbert",
        help="the tiny encoder's architecture (default modernbert: side by side with bert it reached a lower "
        "MLM loss in the same minutes and fine-tuned better, see the README)",
    )
    p.add_argument("--seeds", type=int, default=5, help="fine-tuning seeds per model (median reported)")
    p.add_argument(
        "--lr",
        type=float,
        nargs="+",
        default=[3e-4, 1e-3],
        metavar="LR",
        help="fine-tuning learning rates tried for both models (default 3e-4 1e-3)",
    )
    p.set_defaults(run=run)


def start_over(run_dir: Path) -> None:
    """Empty the demo's run directory, a demo always starting over, once this process holds it (the
    lock `pretrain` takes), so that a job using it is refused, never pulled from under. The lock file
    stays: removed, the next job would lock a new file while this one holds the old."""
    import shutil

    from mlm_pretrain.run_dir import LOCK, hold_run_dir

    hold_run_dir(run_dir)
    for entry in run_dir.iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def run(args: argparse.Namespace) -> int:
    require_at_least_one(args, "tokens", "seeds")
    from mlm_pretrain.corpus import PACKAGE_DATA, TextStream
    from mlm_pretrain.finetune import FinetuneConfig, finetune, load_task
    from mlm_pretrain.finetune.results import gain_over_random_init, seed_range
    from mlm_pretrain.recipe import load_recipe
    from mlm_pretrain.schema import PretrainRecipe
    from mlm_pretrain.tokenizer import train_tokenizer
    from mlm_pretrain.trainer import pretrain

    out = Path(args.out)
    start_over(out / "pretrain")
    tokenizer_dir = out / "tokenizer"
    print(f"[1/4] training a WordPiece tokenizer on the sample corpus -> {tokenizer_dir}")
    report = train_tokenizer(
        TextStream(["@sample"], shuffle_files=False),
        tokenizer_dir,
        kind="wordpiece",
        vocab_size=8192,
        validation=TextStream(["@sample-validation"]),
    )
    print(
        f"      {report.vocab_size} tokens; on held-out text: UNK rate {report.unk_rate:.4f}, "
        f"{report.fertility:.2f} tokens per word"
    )

    print(f"[2/4] pretraining a tiny {args.model_type} on {args.tokens:,} tokens -> {out / 'pretrain'}")
    recipe = load_recipe(
        PretrainRecipe,
        PACKAGE_DATA / "recipes" / "tiny.yaml",
        [
            f"data.tokenizer={tokenizer_dir}",
            f"model.type={args.model_type}",
            f"impl.out={out / 'pretrain'}",
            "max_steps=null",
            "impl.threads=1",  # a tiny model gains nothing from a second thread, and loses on a busy machine
            f"max_tokens={args.tokens}",
        ],
    )
    metrics = pretrain(recipe)
    print(
        f"      validation MLM loss {metrics['eval_loss']:.3f} (perplexity {metrics['eval_perplexity']:.0f}, "
        f"masked-token accuracy {metrics['eval_accuracy']:.3f})"
    )

    model_dir = out / "pretrain" / "final"
    task = load_task(str(PACKAGE_DATA / "tasks" / "rt_sentiment"))
    lrs = ", ".join(f"{lr:g}" for lr in args.lr)
    # The same grid for both sides, each keeping its own best rate by validation. A tiny model wants
    # larger rates than the default 1e-4 (set for 4x256 and up), which leaves a 2x64 BERT from random
    # initialisation at the majority class. A ModernBERT classifies from the mean of its token states:
    # MLM never trains the first token's state to speak for the sentence; in five pretraining variants
    # the mean raised the pretrained tiny model's median 1.7-4.7 points, and random initialisation's
    # not at all (bench/RESULTS.md, "The demo").
    pooling = "mean" if args.model_type == "modernbert" else "cls"
    config = FinetuneConfig(lrs=args.lr, threads=1, pooling=pooling)
    print(
        f"[3/4] fine-tuning our checkpoint on {task.name} ({len(task.train)} training sentences, "
        f"{args.seeds} seeds x learning rates {lrs}), then [4/4] the same architecture from random "
        "initialisation, the same way"
    )
    result = finetune(model_dir, task, out / "finetune", seeds=args.seeds, config=config, random_init=True)

    split = next(iter(result["median"]))
    sides = (("our pretrained checkpoint", result), ("same architecture, random init", result["random_init"]))
    rows = [(name, side["median"][split], seed_range(side, split), f"{side['lr']:g}") for name, side in sides]
    rows.append(("TF-IDF + logistic regression", result["baseline"]["scores"][split]["score"], "—", "—"))
    print(
        f"\n{task.name}, {split} split, {'/'.join(task.metrics)} (encoders: median of {args.seeds} seeds at "
        f"the learning rate of {lrs} with the best median validation score, {pooling} pooling)"
    )
    print("| model | score | seeds | learning rate |\n|---|---|---|---|")
    for name, score, spread, lr in rows:
        print(f"| {name} | {score:.4f} | {spread} | {lr} |")
    print(f"\n{gain_over_random_init(result, split)}.")
    print(
        f"\ncheckpoint: {model_dir} (AutoModelForSequenceClassification.from_pretrained loads it); "
        f"tables: {out}/finetune/results.md"
    )
    return 0
