"""Pretraining throughput: `mlm-pretrain pretrain` against the HF Trainer path a user would otherwise run, on
the CPU or a GPU (`--device cpu|cuda`): tokens/s, MFU, peak memory, and how they grow with model size.

The peer is `run_mlm.py`'s Trainer (`bench.peers.mlm_trainer`): `BertForMaskedLM` +
`DataCollatorForLanguageModeling(mlm_probability=0.15)` + `transformers.Trainer`. Both sides train the same
BERT (`--shapes LxH`: heads H/64, at least 2, intermediate 4H) from the same initial weights, with the same
tokenizer, on the same blocks (ours streams them; the peer gets the very blocks our stream yields,
pre-tokenized as run_mlm's `group_texts` leaves them, in its own shuffled order), with the same optimiser
settings and schedule. Ours is the real command, `mlm_pretrain.cli.main(["pretrain", ...])` in a child
process; both clocks tick at the same logged steps (on a GPU after a `torch.cuda.synchronize()`), and ours
stops at the last timed step (the final evaluation and export are not what is timed).

Settings, each compared at equal settings: fp32 eager, and bf16 autocast + `torch.compile` (ours compiles
the encoder layers and the head; the peer runs `Trainer(bf16=True, torch_compile=True)`). Every run is a
child process (its peak memory is its own); rounds alternate ours / peer; the first `--warmup` steps
(compilation, shuffle-buffer fill) are not timed. FLOPs and MFU: `bench.measure.flops_per_token` (model
FLOPs, the head at every position, for both sides; "ours exec MFU" counts our head at the masked positions
only), over the best and the median n^3 `torch.matmul` of the same precision measured in the same rounds,
and on a GPU over its data-sheet bf16 peak.

    python -m bench.pretrain_speed                            # CPU, 4x256, fp32 and bf16-compile, 3 rounds
    python -m bench.pretrain_speed --settings fp32 --shapes 2x128 4x256 8x512 --json bench/results/growth.json
    python -m bench.pretrain_speed --plot bench/results/growth.json   # tokens/s and peak RSS, a PNG
    python -m bench.pretrain_speed --device cuda --shapes 12x768 --seq-lens 128 --batches 256 \\
        --settings bf16-compile --rounds 1 --warmup 20 --steps 50   # bert-base on a GPU

The tokenizer is `--tokenizer`, trained (WordPiece, `--vocab`) on the corpus first if the directory is
missing. Every configuration's figures are added to `--json` as it finishes (a rerun skips those there).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.measure import Clock, flops_per_token, machine, matmul_flops, mfu, spec_peak_tflops
from bench.sides import DEFAULT_DATA, ROOT, pyplot, report, run_side, save_figure, smoke_data, table

SETTINGS = {"fp32": ("no", False), "bf16-compile": ("bf16", True)}  # name: (impl.mixed_precision, compile)
SUMMARY = [
    "ours tok/s",
    "HF tok/s",
    "ours/HF (range)",
    "per CPU-s",
    "ours RSS MB",
    "HF RSS MB",
    "ours GPU GB",
    "HF GPU GB",
    "ours MFU",
    "HF MFU",
    "ours MFU (median)",
    "HF MFU (median)",
    "ours MFU (spec)",
    "HF MFU (spec)",
    "ours exec MFU",
]


def precision_of(setting: str) -> str:
    return "bf16" if SETTINGS[setting][0] == "bf16" else "fp32"


def shape(text: str) -> tuple[int, int]:
    """Layers and hidden size of a LAYERSxHIDDEN string: "4x256" -> (4, 256)."""
    layers, _, hidden = text.partition("x")
    return int(layers), int(hidden)


def recipe_overrides(job: dict) -> list[str]:
    """The recipe both sides follow, as `mlm-pretrain pretrain` key=value overrides."""
    precision, compile_ = SETTINGS[job["setting"]]
    layers, hidden = shape(job["shape"])
    overrides = [
        f"data.corpus=['{job['corpus']}']",
        "data.validation=['@sample-validation']",  # never read: the run stops before its final evaluation
        f"data.tokenizer={job['tokenizer']}",
        f"data.seq_len={job['seq_len']}",
        "model.type=bert",
        f"model.hidden_size={hidden}",
        f"model.num_layers={layers}",
        f"model.num_heads={max(hidden // 64, 2)}",
        f"model.intermediate_size={4 * hidden}",
        "mlm.mask_rate=0.15",
        "mlm.masking=token",  # what DataCollatorForLanguageModeling does
        f"optim.batch_size={job['batch']}",
        f"optim.micro_batch_size={job['batch']}",
        f"max_steps={job['warmup'] + job['steps']}",
        f"impl.mixed_precision='{precision}'",  # quoted: YAML reads a bare no as false
        f"impl.compile={str(compile_).lower()}",
        f"impl.log_every={job['log_every']}",
        "impl.eval_every=1000000000",
        "impl.save_every=1000000000",
        "impl.progress=false",
        "impl.log_with=[]",
        f"impl.threads={job['threads']}",  # as the peer's
    ]
    return overrides + ([f"impl.parallel={job['parallel']}"] if job.get("parallel") else [])


# ---------------------------------------------------------------------------------------------- the sides


class Finished(BaseException):
    """Raised from the trainer's log call at the last timed step: the figures are in; skip the epilogue."""


def side_ours(job: dict) -> dict:
    """The real `mlm-pretrain pretrain` command, in this process, stopped after the last timed step."""
    from mlm_pretrain.cli import main
    from mlm_pretrain.run_log import RunLog

    clock, last, losses = Clock(job["device"] == "cuda"), job["warmup"] + job["steps"], []
    log = RunLog.log

    def log_and_clock(self, step: int, **metrics: float) -> None:
        log(self, step, **metrics)
        if "tokens_per_s" in metrics:
            clock.tick(step)
            losses.append(metrics["loss"])
            if step >= last:
                raise Finished

    RunLog.log = log_and_clock
    out = Path(job["work"]) / f"ours-{job['setting']}-{job['round']}"
    try:
        code = main(["pretrain", *recipe_overrides(job), f"model.init_from={job['init']}", f"impl.out={out}"])
        sys.exit(f"mlm-pretrain pretrain ended (exit {code}) before step {last}")
    except Finished:
        pass
    finally:
        RunLog.log = log
        shutil.rmtree(out, ignore_errors=True)
    return {**clock.speeds(job["batch"] * job["seq_len"], job["warmup"]), "losses": losses}


def side_hf(job: dict) -> dict:
    """HF's run_mlm.py path on our stream's blocks."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM

    from bench.peers import blocks_dataset, mlm_trainer

    cuda = job["device"] == "cuda"
    if not cuda:
        torch.set_num_threads(job["threads"])  # as ours does
    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"])
    model = BertForMaskedLM.from_pretrained(job["init"], attn_implementation="sdpa")
    clock = Clock(cuda)
    trainer = mlm_trainer(
        model,
        tokenizer,
        blocks_dataset(np.load(job["blocks"]).astype(np.int64), tokenizer),
        Path(job["work"]) / f"hf-{job['setting']}-{job['round']}",
        batch_size=job["batch"],
        max_steps=job["warmup"] + job["steps"],
        optim=job["optim"],
        precision=precision_of(job["setting"]),
        compile=SETTINGS[job["setting"]][1],
        device=job["device"],
        workers=4 if cuda else 0,
        logging_steps=job["log_every"],
        clock=clock,
    )
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {**clock.speeds(job["batch"] * job["seq_len"], job["warmup"]), "losses": losses}


def side_ceiling(job: dict) -> dict:
    """The best and the median rate of a large `torch.matmul` on this device now, in GFLOP/s, in each
    precision the settings train in (a CPU without bf16 instructions takes minutes for one product)."""
    import torch

    cuda = job["device"] == "cuda"
    if not cuda:
        torch.set_num_threads(job["threads"])
    figures = {"device_name": torch.cuda.get_device_name() if cuda else None}
    for name in sorted({precision_of(s) for s in job["settings"]}):
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        best, median = matmul_flops(dtype, job["matmul_n"], job["matmul_calls"], job["device"])
        figures[f"{name}_gflops"], figures[f"{name}_median_gflops"] = best / 1e9, median / 1e9
    return figures


# ---------------------------------------------------------------------------------------------- the parent


def ensure_tokenizer(args: argparse.Namespace, corpus: str) -> None:
    if (Path(args.tokenizer) / "tokenizer.json").is_file():
        return
    print(
        f"training a {args.vocab:,}-token WordPiece tokenizer on {corpus} into {args.tokenizer}", flush=True
    )
    subprocess.run(
        [sys.executable, "-m", "mlm_pretrain", "tokenizer", "--corpus", corpus, "--min-frequency", "1"]
        + ["--vocab-size", str(args.vocab), "--out", args.tokenizer],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )


def prepare(job: dict) -> dict:
    """Write the shared initial weights and the peer's blocks (the blocks our stream yields); count FLOPs."""
    import numpy as np
    import torch

    from mlm_pretrain.corpus import TextStream
    from mlm_pretrain.models import build_model
    from mlm_pretrain.objectives.mlm import mask_batch
    from mlm_pretrain.packing import BlockStream, TokenInfo, collate
    from mlm_pretrain.recipe import load_recipe
    from mlm_pretrain.schema import PretrainRecipe
    from mlm_pretrain.tokenizer import load_tokenizer

    recipe = load_recipe(PretrainRecipe, None, [o for o in recipe_overrides(job) if "parallel" not in o])
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.model, tokenizer, recipe.data.seq_len)
    model.save_pretrained(job["init"])
    # the stream exactly as `pretrain` builds it (one process), so these are the blocks ours trains on
    documents = TextStream(
        recipe.data.corpus, text_field=recipe.data.text_field, seed=recipe.seed, epochs=None
    )
    stream = BlockStream(
        documents, tokenizer, recipe.data.seq_len, shuffle_buffer=recipe.data.shuffle_buffer, seed=recipe.seed
    )
    count = (job["warmup"] + job["steps"]) * job["batch"]
    started = time.perf_counter()
    blocks = np.stack([block for _, block in zip(range(count), stream, strict=False)])
    stream_seconds = time.perf_counter() - started
    np.save(job["blocks"], blocks)
    info = TokenInfo(tokenizer)
    _, predict = mask_batch(
        collate(list(blocks[:1024]), info), info, recipe.mlm, torch.Generator().manual_seed(0)
    )
    fraction = float(predict.float().mean())
    optim = recipe.optim
    return {
        "vocab": model.config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "masked_fraction": fraction,
        "flops_per_token": flops_per_token(model.config, recipe.data.seq_len, fraction),
        # our stream alone (one process, shuffle-buffer fill included): the rate our data path can feed
        "stream_tokens_per_s": stream.tokens_read / stream_seconds,
        "optim": {
            "lr": optim.lr,
            "warmup": optim.warmup,
            "weight_decay": optim.weight_decay,
            "betas": list(optim.betas),
            "eps": optim.eps,
            "clip": optim.clip,
        },
    }


def run_rounds(args: argparse.Namespace, job: dict) -> dict:
    """Every round: the matmul ceiling, then each setting's two sides, in alternating order."""
    work = Path(job["work"])
    results: dict = {"ceiling": [], **{(s, side): [] for s in args.settings for side in ("ours", "hf")}}

    def side(name: str, tag: str, **extra) -> dict:
        path = work / f"job-{tag}.json"
        path.write_text(json.dumps({**job, **extra}))
        torchrun = ["--standalone", "--nproc_per_node=1"] if name == "ours" and args.parallel else []
        return run_side(
            "pretrain_speed", name, ["--job", str(path)], launcher=torchrun, inline=args.smoke,
            timeout=args.side_timeout, tolerate=True,
        )  # fmt: skip

    for round_ in range(args.rounds):
        results["ceiling"].append(side("ceiling", f"ceiling-{round_}", settings=args.settings))
        for setting in args.settings:
            order = ("ours", "hf") if round_ % 2 == 0 else ("hf", "ours")
            for name in order:
                figures = side(name, f"{name}-{setting}-{round_}", setting=setting, round=round_)
                results[setting, name].append(figures)
                if "error" not in figures:
                    gpu = f", peak GPU {figures['peak_gpu_gb']:.1f} GB" if figures["peak_gpu_gb"] else ""
                    print(
                        f"round {round_ + 1}/{args.rounds} {setting:>12} {name:>4}: "
                        f"{figures['tokens_per_s']:,.0f} tokens/s, peak RSS {figures['rss_mb']:,} MB{gpu}",
                        flush=True,
                    )
    return results


def gpu_memory(runs: list[dict]) -> str:
    memory = [r["peak_gpu_gb"] for r in runs if r["peak_gpu_gb"] is not None]
    return f"{max(memory):.1f}" if memory else "-"


def summarise(args: argparse.Namespace, prep: dict, results: dict) -> list[list]:
    """One row per setting, in SUMMARY's order after the setting's name; "-" where a side failed."""
    ok = [r for r in results["ceiling"] if "error" not in r]
    kinds = {precision_of(s) for s in args.settings}
    # a ceiling: the best of all rounds (a round under other people's load measures them, not the machine);
    # and the rate the matmul keeps up: the median of the rounds' medians (see `matmul_flops`)
    best = {p: max((r[f"{p}_gflops"] for r in ok), default=0) * 1e9 for p in kinds}
    typical = {p: statistics.median([r[f"{p}_median_gflops"] for r in ok] or [0]) * 1e9 for p in kinds}
    spec = spec_peak_tflops(next((r["device_name"] for r in ok), None))
    flops = prep["flops_per_token"]

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    rows = []
    for setting in args.settings:
        runs = {side: [r for r in results[setting, side] if "error" not in r] for side in ("ours", "hf")}
        if not all(runs.values()):
            rows.append([setting, *["-"] * len(SUMMARY)])
            continue
        speed = {side: statistics.median(r["tokens_per_s"] for r in runs[side]) for side in runs}
        pairs = [
            (o, h) for o, h in zip(results[setting, "ours"], results[setting, "hf"], strict=True)
            if "error" not in o and "error" not in h
        ]  # fmt: skip
        ratios = [o["tokens_per_s"] / h["tokens_per_s"] for o, h in pairs]
        cpu_ratios = [o["tokens_per_cpu_s"] / h["tokens_per_cpu_s"] for o, h in pairs]
        precision = precision_of(setting)
        peak = spec * 1e12 if spec and precision == "bf16" else None

        rows.append(
            [
                setting,
                speed["ours"],
                speed["hf"],
                f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})",
                f"{statistics.median(cpu_ratios):.2f}x",
                max(r["rss_mb"] for r in runs["ours"]),
                max(r["rss_mb"] for r in runs["hf"]),
                *(gpu_memory(runs[s]) for s in ("ours", "hf")),
                *(pct(mfu(speed[s], flops["model"], best[precision])) for s in ("ours", "hf")),
                *(pct(mfu(speed[s], flops["model"], typical[precision])) for s in ("ours", "hf")),
                *(pct(mfu(speed[s], flops["model"], peak)) for s in ("ours", "hf")),
                pct(mfu(speed["ours"], flops["exec_ours"], best[precision])),
            ]
        )
    print(
        "matmul ceiling ("
        + ", ".join(f"{p} best {best[p] / 1e9:,.0f}, median {typical[p] / 1e9:,.0f}" for p in kinds)
        + f" GFLOP/s); spec bf16 peak {f'{spec:,.1f} TFLOP/s' if spec else 'n/a'}"
    )
    print(table(["setting", *SUMMARY], rows))
    for setting in args.settings:  # same initial weights, same blocks: the curves should meet
        last = {
            side: [statistics.mean(r["losses"][-3:]) for r in results[setting, side] if "error" not in r]
            for side in ("ours", "hf")
        }
        if all(last.values()):
            ours, hf = (statistics.median(last[side]) for side in ("ours", "hf"))
            print(
                f"{setting}: training MLM loss per masked token at the end (mean of the last 3 logged, "
                f"median over rounds): ours {ours:.3f}, HF {hf:.3f}"
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--data", default=DEFAULT_DATA, help="data dir with corpus/ [../shared/data; else @sample]"
    )
    parser.add_argument("--tokenizer", default="/tmp/tok30k", help="WordPiece dir (trained if missing)")
    parser.add_argument("--vocab", type=int, default=30522, help="vocabulary of a tokenizer trained here")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--shapes", nargs="+", default=["4x256"], help="model sizes, LAYERSxHIDDEN")
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[128])
    parser.add_argument("--batches", nargs="+", type=int, default=[32], help="blocks per step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    parser.add_argument(
        "--parallel", choices=["ddp", "fsdp"], help="ours under torchrun (one process), so wrapped"
    )
    parser.add_argument("--side-timeout", type=float, default=900, help="seconds one run may take")
    parser.add_argument("--json", help="add each configuration's figures to this file; skip those there")
    parser.add_argument("--plot", metavar="JSON", help="only draw tokens/s and peak RSS of a --json file")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the repo's data, in seconds")
    parser.add_argument("--side", choices=["ours", "hf", "ceiling"], help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        job = json.loads(Path(args.job).read_text())
        figures = {"ours": side_ours, "hf": side_hf, "ceiling": side_ceiling}[args.side](job)
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one report
            report(figures)
        return
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return
    if args.warmup < 1:
        parser.error("--warmup must be at least 1")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device cuda: no CUDA device visible to torch {torch.__version__}")
    work_root = Path(tempfile.mkdtemp(prefix="bench_pretrain_"))
    if args.smoke:
        args.data, args.tokenizer = (
            str(smoke_data()),
            str(ROOT / "tokenizers" / "default-wordpiece-8k"),
        )
        args.settings, args.shapes, args.seq_lens, args.batches = ["fp32"], ["2x64"], [32], [4]
        args.rounds, args.steps, args.warmup = 1, 2, 1
    corpus = Path(args.data) / "corpus"
    corpus = str(corpus.resolve()) if corpus.is_dir() else "@sample"
    print(machine(), flush=True)
    ensure_tokenizer(args, corpus)
    saved = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else {}
    cuda = args.device == "cuda"
    try:
        for size, seq_len, batch in itertools.product(args.shapes, args.seq_lens, args.batches):
            name = f"{size} seq {seq_len} batch {batch}"
            if all(f"{name} {setting}" in saved for setting in args.settings):
                continue
            work = work_root / name.replace(" ", "-")
            work.mkdir()
            job = {
                "device": args.device, "corpus": corpus, "tokenizer": str(Path(args.tokenizer).resolve()),
                "shape": size, "seq_len": seq_len, "batch": batch, "warmup": args.warmup, "steps": args.steps,
                "log_every": math.gcd(args.warmup, args.steps), "parallel": args.parallel,
                "setting": args.settings[0], "work": str(work), "init": str(work / "init"),
                "blocks": str(work / "blocks.npy"), "threads": torch.get_num_threads(),
                "matmul_n": (8192 if cuda else 2048) if not args.smoke else 256,
                "matmul_calls": (20 if cuda else 9) if not args.smoke else 3,
            }  # fmt: skip
            started = time.perf_counter()
            prep = prepare(job)
            job["optim"] = prep["optim"]
            results = run_rounds(args, job)
            g = {k: v / 1e9 for k, v in prep["flops_per_token"].items()}
            print(
                f"\nBERT {size}, vocab {prep['vocab']:,}, {prep['parameters'] / 1e6:.1f}M parameters, "
                f"batch {batch} x {seq_len} tokens on {args.device}; {args.rounds} rounds of {args.warmup} "
                f"untimed + {args.steps} timed steps, medians over rounds; GFLOP/token: model "
                f"{g['model']:.3f}, ours executed {g['exec_ours']:.3f} (head at "
                f"{100 * prep['masked_fraction']:.1f}% of the tokens); our stream alone "
                f"{prep['stream_tokens_per_s']:,.0f} tokens/s"
            )
            rows = summarise(args, prep, results)
            print(f"configuration took {(time.perf_counter() - started) / 60:.1f} minutes", flush=True)
            for setting, row in zip(args.settings, rows, strict=True):
                saved[f"{name} {setting}"] = {
                    "shape": size, "seq_len": seq_len, "batch": batch, "setting": setting,
                    **dict(zip(SUMMARY, row[1:], strict=True)), "machine": machine(),
                }  # fmt: skip
            if args.json:
                Path(args.json).write_text(json.dumps(saved, indent=2) + "\n")
    finally:
        shutil.rmtree(work_root, ignore_errors=True)
    if len(saved) > 1:
        rows = [[name, *(r.get(k, "-") for k in SUMMARY)] for name, r in saved.items()]
        print(table(["configuration", *SUMMARY], rows))


def plot(saved: dict, png: Path) -> None:
    """Tokens/s and peak RSS of both sides (log scale) across the configurations, ordered by model size,
    then sequence length, batch size and setting."""

    def order(name: str) -> tuple:
        row = saved[name]
        return (*shape(row["shape"])[::-1], row["seq_len"], row["batch"], row["setting"])

    names = sorted(saved, key=order)
    x = range(len(names))
    figure, axes = pyplot().subplots(2, 1, figsize=(max(6, 1.2 * len(names)), 7), sharex=True)
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
    save_figure(figure, png, saved[names[0]]["machine"].split(";")[0])


if __name__ == "__main__":
    main()
