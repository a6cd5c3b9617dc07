"""`mlm-pretrain finetune`: fine-tune a checkpoint on a GLUE-style task, beside a TF-IDF baseline."""

from __future__ import annotations

import argparse

from mlm_pretrain.cli.common import require_at_least_one
from mlm_pretrain.errors import InputError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a checkpoint on a GLUE or local task (median of seeds, TF-IDF baseline beside it)",
        description="Fine-tune an encoder checkpoint (ours or any Hugging Face encoder directory) on a "
        "classification or regression task, several seeds with early stopping, and report the median "
        "score beside a TF-IDF + logistic-regression baseline. Given several --lr values, each runs "
        "with every seed and the one with the best median validation score is kept. TASK is a GLUE name "
        "(cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli; from the Hub, or a local copy named by "
        "MLM_PRETRAIN_GLUE_DIR), a directory holding "
        "train/validation/test files (.jsonl, .csv or .tsv; validation optional), or just a name when "
        "--train is given.",
    )
    p.add_argument(
        "--model", required=True, metavar="DIR", help="checkpoint directory (config, weights, tokenizer)"
    )
    p.add_argument("--task", required=True, metavar="NAME_OR_PATH")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="where to write results.json, results.md, results.png and, in DIR/model/, the fine-tuned model "
        "(the best seed on validation) with its tokenizer and a model card",
    )
    p.add_argument(
        "--seeds", type=int, default=3, help="fine-tuning runs; the median is reported (default 3)"
    )
    p.add_argument("--train", metavar="FILE", help="train file of a task given by files")
    p.add_argument("--validation", metavar="FILE", help="validation file (else 10%% of train is held out)")
    p.add_argument("--test", metavar="FILE", help="test file, scored (else the validation file is)")
    p.add_argument(
        "--text-fields",
        metavar="A[,B]",
        help="text field, or two for sentence pairs (default: "
        "sentence1,sentence2 or text or sentence, whichever the rows have)",
    )
    p.add_argument("--label-field", default="label", metavar="NAME", help="default: label")
    p.add_argument(
        "--metric",
        choices=("accuracy", "f1", "matthews_correlation", "pearsonr", "spearmanr"),
        help="default: pearsonr+spearmanr for regression, f1 for imbalanced binary, else accuracy",
    )
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument(
        "--lr",
        type=float,
        nargs="+",
        default=[1e-4],
        metavar="LR",
        help="peak learning rate, or several to choose from on validation (default 1e-4, for small models)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=float, default=0.1, help="warmup fraction of the run (default 0.1)")
    p.add_argument("--patience", type=int, default=2, help="epochs without improvement before stopping")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example, longer ones truncated")
    p.add_argument("--mixed-precision", choices=("no", "bf16"), default="no")
    p.add_argument(
        "--pooling",
        choices=("cls", "mean"),
        default="cls",
        help="the classifier's input: the first token's state (default) or the mean over the tokens "
        "(ModernBERT's `classifier_pooling`, saved in the fine-tuned model's config)",
    )
    p.add_argument(
        "--layer-decay",
        type=float,
        default=1.0,
        help="layer-wise learning-rate decay: each layer learns at this fraction of the rate of the one "
        "above, the classifier at the peak (default 1.0: every layer at the peak; ELECTRA used 0.8)",
    )
    p.add_argument(
        "--threads", type=int, help="torch threads (default: all cores; 1 is best for tiny models)"
    )
    p.add_argument(
        "--from-scratch",
        action="store_true",
        help="same architecture with random weights: shows what pretraining adds",
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the TF-IDF baseline")
    p.add_argument(
        "--random-init",
        action="store_true",
        help="also fine-tune the same architecture from random initialisation, the same way, and report "
        "it beside (table, plot): what pretraining adds",
    )
    p.add_argument(
        "--push",
        metavar="REPO_ID",
        help="push the fine-tuned model (needs --out) to this Hub model repo, its scores in the model "
        "card's model-index metadata; the token from HF_TOKEN or `hf auth login`",
    )
    p.add_argument("--private", action="store_true", help="with --push: create the repo private")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mlm_pretrain.finetune import FinetuneConfig, finetune, load_task
    from mlm_pretrain.finetune.results import lr_choice, results_table

    require_at_least_one(args, "seeds", "epochs", "batch_size", "max_length")
    if not 0 < args.layer_decay <= 1:
        raise InputError(f"--layer-decay must be in (0, 1], got {args.layer_decay:g}")
    if args.push and not args.out:
        raise InputError("--push needs --out: the fine-tuned model is saved there, then pushed")
    text_fields = tuple(field.strip() for field in args.text_fields.split(",")) if args.text_fields else None
    task = load_task(
        args.task,
        train=args.train,
        validation=args.validation,
        test=args.test,
        text_fields=text_fields,
        label_field=args.label_field,
        metric=args.metric,
    )
    config = FinetuneConfig(
        epochs=args.epochs,
        lrs=args.lr,
        batch_size=args.batch_size,
        warmup=args.warmup,
        patience=args.patience,
        max_length=args.max_length,
        mixed_precision=args.mixed_precision,
        threads=args.threads,
        pooling=args.pooling,
        layer_decay=args.layer_decay,
    )
    result = finetune(
        args.model,
        task,
        args.out,
        seeds=args.seeds,
        config=config,
        from_scratch=args.from_scratch,
        baseline=not args.no_baseline,
        random_init=args.random_init,
    )
    print(f"{lr_choice(result)}\n{results_table(result)}")
    if result["saved_model"]:
        saved = result["saved_model"]
        print(f"fine-tuned model (seed {saved['seed']}): {saved['path']}")
    if args.push:
        from mlm_pretrain.finetune.train import push_finetuned

        pushed = push_finetuned(result, args.push, private=args.private)
        print(f"pushed {result['saved_model']['path']} to {args.push}: {pushed.commit_url}")
    return 0
