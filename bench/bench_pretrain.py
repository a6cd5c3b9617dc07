"""Pretraining throughput: `mlm-pretrain pretrain` against the HF Trainer path a user would otherwise run.

The peer is `run_mlm.py` style: `BertForMaskedLM` + `DataCollatorForLanguageModeling(mlm_probability=0.15)` +
`transformers.Trainer`. Both sides train the same model (BERT, by default 4 layers of 256 with 4 heads and
intermediate 1024, seq 128, batch 32; `--shapes LxH`, `--seq-lens`, `--batches` sweep how cost grows, heads
H/64 and intermediate 4H) from the same initial weights, with a 30,522-token WordPiece tokenizer trained on
the shared corpus (where the vocabulary head dominates a model this small), on the same blocks (ours
streams them; the peer gets the very blocks our stream yields, pre-tokenized in a `datasets.Dataset`, in its
own shuffled order), with the same optimiser settings and schedule. Ours is the real command:
`mlm_pretrain.cli.main(["pretrain", ...])` in a child process, timed from its `metrics.jsonl`.

Two settings, each compared at equal settings: fp32 eager, and bf16 autocast + `torch.compile` (ours compiles
the encoder; the peer runs `Trainer(bf16=True, torch_compile=True, use_cpu=True)`). Every run is a child
process (its peak RSS is its own); rounds alternate ours / peer. The first `--warmup` steps of every run
(compilation, shuffle-buffer fill) are not timed.

FLOPs per token, counted as 6 x (parameters in the matmuls) per position they run at:
    encoder: 6 x L x (4 H^2 + 2 H I)                      at every position, both sides
    head:    6 x (H^2 + H V)   (transform + vocabulary decoder)   at every position (peer) or at the
             masked positions only (ours: a fraction f of the tokens, measured on the blocks)
(attention scores, 12 x L x seq x H per token, are left out on both sides.) MFU is achieved FLOP/s over the
best 2048^3 `torch.matmul` rate of the same precision measured in the run's rounds, and "MFU (median)" over
the median call's rate (the machine's matmul rate switches between two states, see `_common.matmul_flops`).

    python bench/bench_pretrain.py                         # both settings, 3 rounds
    python bench/bench_pretrain.py --settings fp32 --rounds 2 --steps 20
    python bench/bench_pretrain.py --settings fp32 --shapes 2x128 4x256 8x512 12x768 --json runs/growth.json
    python bench/bench_pretrain.py --plot runs/growth.json  # tokens/s and peak RSS per configuration, a PNG

Every configuration's figures are added to `--json` as it finishes (a rerun skips those there).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_DATA,
    ROOT,
    machine,
    matmul_flops,
    matmul_parameters,
    report,
    run_side,
    shape,
    table,
)

SETTINGS = {  # name: (impl.mixed_precision, compile)
    "fp32": ("no", False),
    "bf16-compile": ("bf16", True),
}


def precisions(settings: list[str]) -> list[str]:
    return sorted({"bf16" if SETTINGS[s][0] == "bf16" else "fp32" for s in settings}, reverse=True)


def recipe_overrides(args: argparse.Namespace, setting: str) -> list[str]:
    """The recipe both sides follow, as `mlm-pretrain pretrain` key=value overrides."""
    precision, compile_ = SETTINGS[setting]
    data = Path(args.data)
    layers, hidden = shape(args.shape)
    return [
        f"data.corpus=['{data / 'corpus'}']",
        f"data.validation=['{data / 'validation' / 'corpus_validation.jsonl'}']",
        f"data.tokenizer={args.tokenizer}",
        f"data.seq_len={args.seq_len}",
        "model.type=bert",
        f"model.hidden_size={hidden}",
        f"model.num_layers={layers}",
        f"model.num_heads={max(hidden // 64, 2)}",
        f"model.intermediate_size={4 * hidden}",
        "mlm.mask_rate=0.15",
        "mlm.masking=token",
        f"optim.batch_size={args.batch}",
        f"optim.micro_batch_size={args.batch}",
        f"max_steps={args.warmup + args.steps}",
        f"impl.mixed_precision='{precision}'",  # quoted: YAML reads a bare no as false
        f"impl.compile={str(compile_).lower()}",
        "impl.log_every=1",
        "impl.eval_every=1000000",
        "impl.save_every=1000000",
        "impl.eval_blocks=32",
        "impl.progress=false",
    ]


def load(args: argparse.Namespace, setting: str = "fp32"):
    from mlm_pretrain.recipe import load_recipe
    from mlm_pretrain.trainer import PretrainRecipe

    return load_recipe(PretrainRecipe, None, recipe_overrides(args, setting))


# ---------------------------------------------------------------------------------------------- the sides


class Clock:
    """Wall-clock and CPU time (this process, all threads) at the end of every training step."""

    def __init__(self, tokens_per_step: int) -> None:
        self.tokens_per_step = tokens_per_step
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def tick(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def speeds(self, warmup: int) -> dict:
        """Tokens per second and per CPU-second over the steps after the first `warmup`."""
        tokens = (len(self.wall) - warmup) * self.tokens_per_step
        return {
            "tokens_per_s": tokens / (self.wall[-1] - self.wall[warmup - 1]),
            "tokens_per_cpu_s": tokens / (self.cpu[-1] - self.cpu[warmup - 1]),
        }


def side_ours(args: argparse.Namespace) -> dict:
    """The real `mlm-pretrain pretrain` command, in this process; figures read from its metrics.jsonl."""
    from mlm_pretrain.cli import main
    from mlm_pretrain.run_log import RunLog

    # the loop logs every step (impl.log_every=1): read both clocks there, as the peer's on_step_end does
    clock = Clock(args.batch * args.seq_len)
    log = RunLog.log

    def log_and_clock(self, step: int, **metrics: float) -> None:
        log(self, step, **metrics)
        if "tokens_per_s" in metrics:
            clock.tick()

    RunLog.log = log_and_clock
    out = Path(args.work) / f"ours-{args.setting}-{args.round}"
    argv = ["pretrain", *recipe_overrides(args, args.setting), f"model.init_from={args.work}/init"]
    if main([*argv, f"impl.out={out}"]) != 0:
        sys.exit("mlm-pretrain pretrain failed")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out)
    return {**clock.speeds(args.warmup), "losses": [r["loss"] for r in records if "tokens_per_s" in r]}


def side_hf(args: argparse.Namespace) -> dict:
    """HF's run_mlm.py path: BertForMaskedLM + DataCollatorForLanguageModeling + Trainer."""
    import datasets
    import numpy as np
    import torch
    from transformers import (
        AutoTokenizer,
        BertForMaskedLM,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    torch.set_num_threads(os.cpu_count() or 1)  # as ours does
    precision, compile_ = SETTINGS[args.setting]
    optim = load(args, args.setting).optim
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    blocks = np.load(Path(args.work) / "blocks.npy").astype(np.int64)
    dataset = datasets.Dataset.from_dict(
        {
            "input_ids": blocks,
            "attention_mask": (blocks != tokenizer.pad_token_id).astype(np.int64),
            "special_tokens_mask": np.isin(blocks, tokenizer.all_special_ids).astype(np.int64),
        }
    )
    model = BertForMaskedLM.from_pretrained(Path(args.work) / "init")

    clock = Clock(args.batch * args.seq_len)

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__) -> None:
            clock.tick()

    training_args = TrainingArguments(
        output_dir=str(Path(args.work) / f"hf-{args.setting}-{args.round}"),
        per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps,
        learning_rate=optim.lr,
        lr_scheduler_type="linear",
        warmup_steps=optim.warmup,  # a float below 1 is a fraction of the run, as ours
        weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1],
        adam_epsilon=optim.eps,
        max_grad_norm=optim.clip,
        bf16=precision == "bf16",
        torch_compile=compile_,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        remove_unused_columns=False,  # keep special_tokens_mask for the collator, as run_mlm.py means to
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15),
        callbacks=[StepClock()],
    )
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {**clock.speeds(args.warmup), "losses": losses}


def side_ceiling(args: argparse.Namespace) -> dict:
    """The best and the median rate of a large `torch.matmul` on this machine now, in GFLOP/s, in each
    precision that `--settings` trains in (a CPU without bf16 instructions takes minutes for one product)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    figures = {}
    for name in precisions(args.settings):
        best, median = matmul_flops(dtypes[name])
        figures[f"{name}_gflops"], figures[f"{name}_median_gflops"] = best / 1e9, median / 1e9
    return figures


# ---------------------------------------------------------------------------------------------- the parent


def ensure_tokenizer(args: argparse.Namespace) -> None:
    if (Path(args.tokenizer) / "tokenizer.json").is_file():
        return
    print(
        f"training a 30,522-token WordPiece tokenizer on {args.data}/corpus into {args.tokenizer}", flush=True
    )
    subprocess.run(
        [sys.executable, "-m", "mlm_pretrain", "tokenizer", "--corpus", f"{args.data}/corpus"]
        + ["--vocab-size", "30522", "--out", args.tokenizer],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )


def prepare(args: argparse.Namespace) -> dict:
    """Write the shared initial weights and the peer's blocks; check the sparse loss on one batch.

    Returns the FLOP counts and the loss check."""
    import numpy as np
    import torch

    from mlm_pretrain.batches import masked_micro_batch
    from mlm_pretrain.corpus import TextStream
    from mlm_pretrain.models import build_model
    from mlm_pretrain.objectives.mlm import SparseMLM, mask_batch
    from mlm_pretrain.packing import BlockStream, TokenInfo, collate
    from mlm_pretrain.tokenizer import load_tokenizer

    recipe = load(args)
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.model, tokenizer, recipe.data.seq_len)
    model.save_pretrained(Path(args.work) / "init")
    # the stream exactly as `pretrain` builds it (one process), so these are the blocks ours trains on
    documents = TextStream(
        recipe.data.corpus, text_field=recipe.data.text_field, seed=recipe.seed, epochs=None
    )
    stream = BlockStream(
        documents, tokenizer, recipe.data.seq_len, shuffle_buffer=recipe.data.shuffle_buffer, seed=recipe.seed
    )
    count = (args.warmup + args.steps) * args.batch
    blocks = np.stack([block for _, block in zip(range(count), stream, strict=False)])
    np.save(Path(args.work) / "blocks.npy", blocks)

    # the fraction of tokens the sparse head runs at, and our loss against HF's on one masked batch
    info = TokenInfo(tokenizer)
    batch = collate(list(blocks), info)
    _, predict = mask_batch(batch, info, recipe.mlm, torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        small = {k: v[:8] for k, v in batch.items()}
        inputs, mask = mask_batch(small, info, recipe.mlm, torch.Generator().manual_seed(1))
        parts = masked_micro_batch(small["input_ids"], small["attention_mask"], inputs, mask)
        sparse, _ = SparseMLM(model)(**parts)
        labels = torch.where(mask, small["input_ids"], -100)
        dense = model(input_ids=inputs, attention_mask=small["attention_mask"], labels=labels).loss
    encoder, head = matmul_parameters(model.config)
    fraction = float(predict.float().mean())
    return {
        "vocab": model.config.vocab_size,
        "masked_fraction": fraction,
        "flops_per_token": {"ours": 6 * (encoder + fraction * head), "hf": 6 * (encoder + head)},
        "sparse_loss": float(sparse / mask.sum()),
        "dense_loss": float(dense),
        "masked_in_check": int(mask.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=DEFAULT_DATA, help="the shared data directory [../shared/data]")
    parser.add_argument("--tokenizer", default="/tmp/tok30k", help="30k WordPiece dir (trained if missing)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--shapes", nargs="+", default=["4x256"], help="model sizes, LAYERSxHIDDEN")
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[128])
    parser.add_argument("--batches", nargs="+", type=int, default=[32], help="blocks per step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    parser.add_argument("--json", help="add each configuration's figures to this file; skip those there")
    parser.add_argument("--plot", metavar="JSON", help="only draw tokens/s and peak RSS of a --json file")
    parser.add_argument("--side", choices=["ours", "hf", "ceiling"], help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1")
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return
    if args.side:
        report({"ours": side_ours, "hf": side_hf, "ceiling": side_ceiling}[args.side](args))
        return

    print(machine(), flush=True)
    ensure_tokenizer(args)
    saved = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else {}
    for size, seq_len, batch in itertools.product(args.shapes, args.seq_lens, args.batches):
        args.shape, args.seq_len, args.batch = size, seq_len, batch
        name = f"{args.shape} seq {args.seq_len} batch {args.batch}"
        if all(f"{name} {setting}" in saved for setting in args.settings):
            continue
        started = time.perf_counter()
        args.work = tempfile.mkdtemp(prefix="bench_pretrain_")
        try:
            prep = prepare(args)
            results = run_rounds(args)
        finally:
            shutil.rmtree(args.work, ignore_errors=True)
        rows = print_results(args, prep, results, time.perf_counter() - started)
        for setting, row in zip(args.settings, rows, strict=True):
            saved[f"{name} {setting}"] = {
                "shape": args.shape, "seq_len": args.seq_len, "batch": args.batch, "setting": setting,
                **dict(zip(SUMMARY, row[1:], strict=True)), "machine": machine(),
            }  # fmt: skip
        if args.json:
            Path(args.json).write_text(json.dumps(saved, indent=2) + "\n")
    if len(saved) > 1:
        # configurations saved by an earlier version of this script have no median MFU
        rows = [[name, *(r.get(k, "-") for k in SUMMARY)] for name, r in saved.items()]
        print(table(["configuration", *SUMMARY], rows))


SUMMARY = [
    "ours tok/s",
    "HF tok/s",
    "ratio (range)",
    "per CPU-s",
    "ours RSS MB",
    "HF RSS MB",
    "ours MFU",
    "HF MFU",
    "ours MFU (median)",
    "HF MFU (median)",
]


def run_rounds(args: argparse.Namespace) -> dict:
    common = [
        "--data", args.data, "--tokenizer", args.tokenizer, "--work", args.work,
        "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--shape", args.shape, "--seq-len", str(args.seq_len), "--batch", str(args.batch),
    ]  # fmt: skip
    results: dict = {"ceiling": [], **{(s, side): [] for s in args.settings for side in ("ours", "hf")}}
    for round_ in range(args.rounds):
        results["ceiling"].append(
            run_side("bench_pretrain.py", "ceiling", [*common, "--settings", *args.settings])
        )
        for setting in args.settings:
            order = ("ours", "hf") if round_ % 2 == 0 else ("hf", "ours")
            for side in order:
                figures = run_side(
                    "bench_pretrain.py", side, [*common, "--setting", setting, "--round", str(round_)]
                )
                results[setting, side].append(figures)
                print(
                    f"round {round_ + 1}/{args.rounds} {setting:>12} {side:>4}: "
                    f"{figures['tokens_per_s']:,.0f} tokens/s, "
                    f"{figures['tokens_per_cpu_s']:,.0f} tokens/CPU-s, "
                    f"peak RSS {figures['rss_mb']:,} MB",
                    flush=True,
                )
    return results


def print_results(args: argparse.Namespace, prep: dict, results: dict, seconds: float) -> list[list]:
    """Print one configuration's tables; return its rows (one per setting) in SUMMARY's order."""
    # a ceiling: the best of all rounds (a round under other people's load measures them, not the machine);
    # and the rate the matmul keeps up: the median of the rounds' medians (see `matmul_flops`)
    rounds, kinds = results["ceiling"], precisions(args.settings)
    ceiling = {p: max(r[f"{p}_gflops"] for r in rounds) for p in kinds}
    sustained = {p: statistics.median(r[f"{p}_median_gflops"] for r in rounds) for p in kinds}
    flops = prep["flops_per_token"]
    rows, losses = [], []
    for setting in args.settings:
        precision = "bf16" if SETTINGS[setting][0] == "bf16" else "fp32"
        peak, typical = ceiling[precision] * 1e9, sustained[precision] * 1e9
        runs = {side: results[setting, side] for side in ("ours", "hf")}
        speed = {side: statistics.median(r["tokens_per_s"] for r in runs[side]) for side in runs}
        pairs = list(zip(runs["ours"], runs["hf"], strict=True))  # the same round: the same load, roughly
        ratios = [o["tokens_per_s"] / h["tokens_per_s"] for o, h in pairs]
        cpu_ratios = [o["tokens_per_cpu_s"] / h["tokens_per_cpu_s"] for o, h in pairs]
        rows.append(
            [
                setting,
                speed["ours"],
                speed["hf"],
                f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})",
                f"{statistics.median(cpu_ratios):.2f}x",
                max(r["rss_mb"] for r in runs["ours"]),
                max(r["rss_mb"] for r in runs["hf"]),
                f"{100 * speed['ours'] * flops['ours'] / peak:.1f}%",
                f"{100 * speed['hf'] * flops['hf'] / peak:.1f}%",
                f"{100 * speed['ours'] * flops['ours'] / typical:.1f}%",
                f"{100 * speed['hf'] * flops['hf'] / typical:.1f}%",
            ]
        )
        for side in ("ours", "hf"):
            curve = [statistics.median(step) for step in zip(*(r["losses"] for r in runs[side]), strict=True)]
            marks = sorted({1, len(curve) // 4, len(curve) // 2, 3 * len(curve) // 4, len(curve)} - {0})
            losses.append([setting, side, *(curve[i - 1] for i in marks), statistics.mean(curve[-10:])])
    print()
    print(
        f"BERT {args.shape}, vocab {prep['vocab']:,}, batch {args.batch} x {args.seq_len} tokens; "
        f"{args.rounds} rounds, {args.steps} timed steps per run after {args.warmup}; medians over rounds"
    )
    print(
        f"matmul ceiling (2048^3, 9 calls in each of {args.rounds} rounds): "
        + ", ".join(f"{p} best {ceiling[p]:,.0f}, median {sustained[p]:,.0f} GFLOP/s" for p in ceiling)
    )
    print(
        f"FLOPs/token: ours {flops['ours'] / 1e6:.1f}M (head at {100 * prep['masked_fraction']:.1f}% of "
        f"tokens), HF {flops['hf'] / 1e6:.1f}M (head at every token)"
    )
    header = ["setting", "ours tok/s", "HF tok/s", "ratio (range)", "per CPU-s", "ours RSS MB", "HF RSS MB"]
    print(table([*header, "ours MFU", "HF MFU", "ours MFU (median)", "HF MFU (median)"], rows))
    print()
    steps = args.warmup + args.steps
    marks = sorted({1, steps // 4, steps // 2, 3 * steps // 4, steps} - {0})
    print("training MLM loss per masked token (median over rounds), same init, same blocks, lr schedule:")
    print(table(["setting", "side", *(f"step {m}" for m in marks), "mean last 10"], losses))
    print()
    print(
        f"one identical masked batch (8 blocks, {prep['masked_in_check']} masked, fp32, initial weights): "
        f"SparseMLM loss/masked {prep['sparse_loss']:.6f}, "
        f"HF BertForMaskedLM dense loss {prep['dense_loss']:.6f}"
    )
    print(f"configuration took {seconds / 60:.1f} minutes")
    return rows


def plot(saved: dict, png: Path) -> None:
    """Tokens/s and peak RSS of both sides (log scale) across the configurations, ordered by model size,
    then sequence length, batch size and setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def order(name: str) -> tuple:
        row = saved[name]
        return (*shape(row["shape"])[::-1], row["seq_len"], row["batch"], row["setting"])

    names = sorted(saved, key=order)
    x = range(len(names))
    figure, axes = plt.subplots(2, 1, figsize=(max(6, 1.2 * len(names)), 7), sharex=True)
    for axis, (ours, hf, label) in zip(
        axes,
        [("ours tok/s", "HF tok/s", "tokens/s"), ("ours RSS MB", "HF RSS MB", "peak RSS (MB)")],
        strict=True,
    ):
        axis.plot(x, [saved[n][ours] for n in names], marker="o", label="mlm-pretrain")
        axis.plot(x, [saved[n][hf] for n in names], marker="s", label="HF Trainer (run_mlm path)")
        axis.set_ylabel(label)
        axis.set_yscale("log")
        axis.legend()
    axes[1].set_xticks(
        list(x), [n.replace(" seq", "\nseq").replace(" batch", "\nbatch") for n in names], fontsize=7
    )
    figure.suptitle(saved[names[0]]["machine"].split(";")[0], fontsize=8)
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
