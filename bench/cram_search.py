"""The CPU-cram recipe search: settings compared at an equal number of training tokens.

Each setting is `recipes/cpu-cram.yaml` plus overrides, trained on the shared corpus for `--tokens`
tokens (not minutes: on a shared 2-core machine a minutes budget measures the load as much as the
recipe) and evaluated on the shared validation text at mask rate 0.15 every `--eval-every` steps.
Results go to `<out>/<setting>/` as each run ends; a rerun skips settings already done, so the search
survives the end of a session. `--table` prints what is done.

    taskset -c 1 python -m bench.cram_search --tokens 4000000   # one core, the other left free
    python -m bench.cram_search --table
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.sides import DEFAULT_DATA, ROOT, SMOKE_CRAM, mlm_pretrain, smoke_data

# name -> overrides of recipes/cpu-cram.yaml; `{corpus}` is the corpus directory
SETTINGS: dict[str, list[str]] = {
    # the recipe as the earlier session shipped it: files one after another, lr 1.5e-3, mask 0.3
    "shipped-sequential": ["data.corpus=[{path: '{corpus}', interleave_files: false}]"],
    # the brief's stable variant, still reading one file after another
    "bert-lr5e-4-mask15-sequential": [
        "data.corpus=[{path: '{corpus}', interleave_files: false}]",
        "optim.lr=5e-4",
        "mlm.mask_rate=0.15",
    ],
    # the same with the files interleaved from the start (the new default)
    "bert-lr5e-4-mask15": ["optim.lr=5e-4", "mlm.mask_rate=0.15"],
    "shipped-interleaved": [],
    # pre-LN, GeGLU, RoPE: ModernBERT's block at the same size, which tolerates a higher rate
    "modernbert-lr1e-3-mask30": ["model.type=modernbert", "optim.lr=1e-3"],
    "modernbert-lr2e-3-mask30": ["model.type=modernbert", "optim.lr=2e-3"],
    # BabyLM: shorter sequences paid; twice the steps for the same tokens
    "modernbert-lr1e-3-mask30-seq64": ["model.type=modernbert", "optim.lr=1e-3", "data.seq_len=64"],
}


def run(name: str, overrides: list[str], args: argparse.Namespace) -> None:
    out = Path(args.out) / name
    if (out / "final" / "config.json").exists():
        return
    corpus = str(Path(args.data) / "corpus")
    argv = [
        "pretrain", "--recipe", str(ROOT / "recipes" / "cpu-cram.yaml"), "--out", str(out),
        "--validation", str(Path(args.data) / "validation" / "corpus_validation.jsonl"),
        "max_minutes=null", f"max_tokens={args.tokens}", f"impl.eval_every={args.eval_every}",
        f"impl.save_every={args.eval_every}", f"impl.threads={args.threads}", "impl.progress=false",
        "--resume",
        *args.override, *(o.replace("{corpus}", corpus) for o in ["data.corpus=['{corpus}']", *overrides]),
    ]  # fmt: skip
    print(f"== {name}: {' '.join(argv[1:])}", flush=True)
    if mlm_pretrain(argv, inline=args.smoke) != 0:
        sys.exit(f"{name} failed")


def summary(out: Path) -> list[dict]:
    rows = []
    for name in SETTINGS:
        metrics = out / name / "metrics.jsonl"
        if not metrics.exists():
            continue
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
        evals = [r for r in records if "eval_loss" in r]
        speeds = sorted(r["tokens_per_s"] for r in records if r.get("tokens_per_s"))
        per_step = next((r["tokens"] / r["step"] for r in records if "tokens" in r), 0)
        rows.append(
            {
                "setting": name,
                "done": (out / name / "final" / "config.json").exists(),
                "evals": [(r["step"] * per_step, r["eval_loss"], r["eval_accuracy"]) for r in evals],
                "median_tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    print("| setting | done | tokens/s (median) | validation loss / masked accuracy at M tokens |")
    print("|---|---|---|---|")
    for row in rows:
        evals = ", ".join(f"{t / 1e6:.1f}M: {loss:.2f} / {acc:.1%}" for t, loss, acc in row["evals"] if t)
        speed = f"{row['median_tokens_per_s']:,.0f}" if row["median_tokens_per_s"] else "-"
        print(f"| {row['setting']} | {'yes' if row['done'] else 'no'} | {speed} | {evals} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--out", default=str(ROOT / "runs" / "cram-search"))
    parser.add_argument("--tokens", type=int, default=4_000_000)
    parser.add_argument("--eval-every", type=int, default=100, help="steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="+", choices=list(SETTINGS), help="run these settings only")
    parser.add_argument("--table", action="store_true", help="print the results so far and stop")
    parser.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE", help="of every setting")
    parser.add_argument("--smoke", action="store_true", help="one setting, a 2x64 model, 4k tokens; seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.data = str(smoke_data())
        args.out, args.tokens, args.eval_every = str(Path(args.data) / "cram-search"), 4096, 4
        args.only, args.override = ["modernbert-lr1e-3-mask30"], SMOKE_CRAM
    if not args.table:
        for name in args.only or SETTINGS:
            run(name, SETTINGS[name], args)
    rows = summary(Path(args.out))
    (Path(args.out) / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    print_table(rows)


if __name__ == "__main__":
    main()
