"""GPU pretraining throughput: `mlm-pretrain pretrain` against the HF Trainer `run_mlm` path, bert-base, bf16.

For each sequence length (default 128 and 512) both sides train the same BERT (12 layers x 768, 12 heads,
intermediate 3072, dropout 0.1: `recipes/bert-base.yaml`'s model, vocabulary from the tokenizer) from the
same initial weights, with the same global batch (default 256 x 128 and 64 x 512 tokens), bf16 autocast,
`torch.compile` and the same AdamW settings; the first `--warmup` steps (compilation, shuffle-buffer fill)
are not timed, the next `--steps` are. Sides alternate (ours, HF / HF, ours) over sequence lengths and
`--rounds`; every run is a child process (`bench_gpu.py --side ...`) that writes its figures, with its own
peak GPU memory (`torch.cuda.max_memory_allocated`), to a JSON file the parent reads.

- ours: the real command, `mlm_pretrain.cli.main(["pretrain", "--recipe", "recipes/bert-base.yaml",
  key=value ...])` in the child (under `torchrun --standalone` when `--parallel` or `--nproc` > 1 asks
  for a process group). It streams, tokenizes, packs and masks the corpus as it trains. The clock reads
  at its log steps (`impl.log_every` = gcd(warmup, steps), the trainer's loss read is a host sync there;
  the clock adds `torch.cuda.synchronize()`); the child stops the run at the last timed step (no final
  evaluation, export or checkpoint: they are not what is timed). The trainer's own tokens/s from
  `metrics.jsonl` is reported beside ours.
- HF: `run_mlm.py` as a careful user runs it: `BertForMaskedLM.from_pretrained(init, attn_implementation=
  "sdpa")`, `DataCollatorForLanguageModeling(mlm_probability=0.15)`, `Trainer(bf16=True,
  torch_compile=True, dataloader_pin_memory=True, dataloader_num_workers=--hf-workers)`, default
  optimizer (fused AdamW), logging every gcd(warmup, steps) steps; its data are `group_texts`-style packed
  blocks, tokenized ahead (as run_mlm's `.map` does, not timed): the very blocks our stream yields
  (same tokens per step, token masking at 15% on both sides).

Data: `--data` (default `../shared/data/corpus` beside the checkout if present, else the package's
`@sample`, Austen and Melville, which is what a GPU machine that got only the repository has). Tokenizer:
`--tokenizer` (default the 8k WordPiece in tokenizers/), or `--vocab 30522` to train a WordPiece of that
size on `--data` first (a few seconds; bert-base's vocabulary size; `@sample` has room for about 22k).
The bigger the vocabulary, the bigger the share of the head, which ours runs at the masked positions only.
Our data path (tokenize, pack, mask) runs on the CPU inside the training loop; the header line "our stream
alone" gives the rate it reaches by itself, so a GPU it cannot feed shows. Runs from a checkout without
`pip install` (it puts the checkout on PYTHONPATH): needs torch, transformers, accelerate, tokenizers,
safetensors, numpy, pyyaml, psutil, tqdm, matplotlib and tensorboard; not datasets.

FLOPs per token (matmuls, 2 per multiply-add, x3 for forward + backward; embeddings lookups not counted):
    encoder    6 L (4 H^2 + 2 H I)               every position, both sides
    attention  12 L S H                          (QK^T and AV at sequence length S), both sides
    MLM head   6 (H^2 + H V)                     (transform + vocabulary decoder)
"model FLOPs" count the head at every position (the usual BERT count, the same for both sides: MFU ratios
equal tokens/s ratios). "executed FLOPs" count what each side computes: HF's dense head runs at every
position, ours only at the masked ones (a fraction f of the tokens, measured on the blocks), so "exec MFU"
is the fraction of the hardware each side keeps busy. MFU is given against the GPU's dense bf16 peak from
its data sheet (H100/H200 SXM: 989 TFLOP/s; `--peak-tflops` for others) and against the best rate of an
8192^3 bf16 `torch.matmul` measured in the same run (the achievable ceiling).

With one GPU, `--parallel ddp|fsdp` changes our side only (passed as the recipe override `parallel=...`,
ours under `torchrun --standalone --nproc_per_node 1`); the HF side stays a plain single process. With
`--nproc N` both sides run under `torchrun --nproc_per_node N` (the global batch is split over the
processes, HF by DDP).

Exit status: 0 when every run finished; 1 when a run failed (the others are still measured and written);
0 with "no CUDA device: nothing measured" when no GPU is present and `--device` is left at auto (CPU CI
needs no GPU); 2 when `--device cuda` is asked for and there is none, or on bad arguments.

    python bench/bench_gpu.py --device cuda       # the GPU run (~5-6 min on an H200): runs/bench_gpu.json
    python bench/bench_gpu.py --device cpu --layers 2 --hidden 64 --seq 32 --batch 8 \\
        --warmup 1 --steps 3 --rounds 1                               # CPU smoke test (~1 minute)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, peak_rss_mb, table  # noqa: E402

sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .` too

RECIPE = ROOT / "recipes" / "bert-base.yaml"
SHARED_CORPUS = ROOT.parent / "shared" / "data" / "corpus"
DEFAULT_TOKENIZER = ROOT / "tokenizers" / "default-wordpiece-8k"
# dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s; first match wins
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),  # also GH200
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
]


# ---------------------------------------------------------------------------------------------- children


class Finished(BaseException):
    """Raised from the trainer's log call at the last timed step: the figures are in; skip the epilogue."""


class Clock:
    """Wall-clock times at chosen steps, each after the device has finished its queued work."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.start = time.perf_counter()
        self.ticks: dict[int, float] = {}

    def tick(self, step: int) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.ticks[step] = time.perf_counter()

    def figures(self, job: dict) -> dict:
        """Tokens/s over the timed steps, the rate of each logging window in them, and the start-up time."""
        warmup, last = job["warmup"], job["warmup"] + job["steps"]
        tokens_per_step = job["batch"] * job["seq"]
        steps = sorted(s for s in self.ticks if warmup <= s <= last)
        windows = [
            (b - a) * tokens_per_step / (self.ticks[b] - self.ticks[a])
            for a, b in zip(steps, steps[1:], strict=False)
        ]
        return {
            "tokens_per_s": job["steps"] * tokens_per_step / (self.ticks[last] - self.ticks[warmup]),
            "window_tokens_per_s": windows,
            "startup_s": self.ticks[warmup] - self.start,  # imports, build, compilation, the warmup steps
            "timed_s": self.ticks[last] - self.ticks[warmup],
        }


def device_memory(cuda: bool) -> dict:
    if not cuda:
        return {"peak_mem_gb": None, "peak_reserved_gb": None}
    import torch

    return {
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30,
        "device_name": torch.cuda.get_device_name(),
    }


def write_result(job: dict, figures: dict) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        Path(job["result"]).write_text(json.dumps({**figures, **peak_rss_mb()}))


def side_ours(job: dict) -> None:
    """The real `mlm-pretrain pretrain` command, in this process, stopped after the last timed step."""
    import torch

    from mlm_pretrain.cli import main
    from mlm_pretrain.run_log import RunLog

    cuda = job["device"] == "cuda"
    clock, last = Clock(cuda), job["warmup"] + job["steps"]
    log = RunLog.log
    out = Path(job["out"])

    def log_and_clock(self, step: int, **metrics: float) -> None:
        log(self, step, **metrics)
        if "tokens_per_s" not in metrics:
            return
        clock.tick(step)
        if step >= last:
            raise Finished

    RunLog.log = log_and_clock
    try:
        code = main(["pretrain", "--recipe", str(RECIPE), *job["overrides"], f"impl.out={out}"])
        sys.exit(f"mlm-pretrain pretrain ended (exit {code}) before step {last}")
    except Finished:
        pass
    figures = clock.figures(job)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tokens_per_s" in r and r["step"] > job["warmup"]]
    figures["trainer_tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in timed) if timed else None
    figures["losses"] = [r["loss"] for r in records if "loss" in r]
    figures["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    figures["torch"] = torch.__version__
    write_result(job, {**figures, **device_memory(cuda)})


def side_hf(job: dict) -> None:
    """HF's run_mlm.py path: BertForMaskedLM + DataCollatorForLanguageModeling + Trainer, on packed blocks."""
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

    cuda = job["device"] == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"])
    blocks = np.load(job["blocks"])
    special = np.isin(blocks, tokenizer.all_special_ids)

    class Blocks(torch.utils.data.Dataset):
        """What `group_texts` leaves in run_mlm's Arrow dataset, read back as run_mlm reads it (lists)."""

        def __len__(self) -> int:
            return len(blocks)

        def __getitem__(self, i: int) -> dict:
            return {
                "input_ids": blocks[i].tolist(),
                "attention_mask": [1] * blocks.shape[1],
                "special_tokens_mask": special[i].astype(np.int64).tolist(),
            }

    model = BertForMaskedLM.from_pretrained(job["init"], attn_implementation="sdpa")
    clock, every = Clock(cuda), job["log_every"]

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs) -> None:
            if state.global_step % every == 0:
                clock.tick(state.global_step)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    optim = job["optim"]
    training_args = TrainingArguments(
        output_dir=job["out"],
        per_device_train_batch_size=job["micro"],
        gradient_accumulation_steps=job["batch"] // (job["micro"] * world),
        max_steps=job["warmup"] + job["steps"],
        learning_rate=optim["lr"],
        lr_scheduler_type="linear",
        warmup_steps=optim["warmup"],
        weight_decay=optim["weight_decay"],
        adam_beta1=optim["betas"][0],
        adam_beta2=optim["betas"][1],
        adam_epsilon=optim["eps"],
        max_grad_norm=optim["clip"],
        bf16=job["precision"] == "bf16",
        torch_compile=job["compile"],
        use_cpu=not cuda,
        dataloader_pin_memory=cuda,
        dataloader_num_workers=job["hf_workers"],
        dataloader_persistent_workers=job["hf_workers"] > 0,
        logging_steps=every,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        remove_unused_columns=False,  # keep special_tokens_mask for the collator, as run_mlm.py means to
        ddp_find_unused_parameters=False,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=Blocks(),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15),
        callbacks=[StepClock()],
    )
    trainer.train()
    figures = clock.figures(job)
    figures["trainer_tokens_per_s"] = None
    figures["losses"] = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    figures["world_size"] = world
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # unwrap accelerate's wrapper
    figures["optimizer"] = f"{type(optimizer).__name__} fused={optimizer.defaults.get('fused')}"
    figures["torch"] = torch.__version__
    write_result(job, {**figures, **device_memory(cuda)})


def side_ceiling(job: dict) -> None:
    """The best rate of a large bf16 `torch.matmul` on this device now, in TFLOP/s."""
    import torch

    n, cuda = job["matmul_n"], job["device"] == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    seconds = []
    for _ in range(job["matmul_reps"]):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b, out=c)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            torch.matmul(a, b, out=c)
            seconds.append(time.perf_counter() - started)
    rates = [2 * n**3 / s / 1e12 for s in seconds]
    figures = {"best_tflops": max(rates), "median_tflops": statistics.median(rates), "n": n}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        figures.update(
            device_name=props.name,
            total_mem_gb=props.total_memory / 2**30,
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
        )
    write_result(job, figures)


# ---------------------------------------------------------------------------------------------- the parent


def per_seq(values: list[int] | None, seqs: list[int], name: str, parser) -> list[int] | None:
    """One value per sequence length (a single value serves all)."""
    if values is None:
        return None
    if len(values) == 1:
        return values * len(seqs)
    if len(values) != len(seqs):
        parser.error(f"{name}: give one value, or one per --seq ({len(seqs)})")
    return values


def run_shape(args: argparse.Namespace) -> dict:
    """The model's shape from the flags (bert-base by default)."""
    heads = args.heads or max(1, args.hidden // 64)
    if args.hidden % heads:
        sys.exit(f"--hidden {args.hidden} is not a multiple of {heads} heads")
    return {
        "num_layers": args.layers,
        "hidden_size": args.hidden,
        "num_heads": heads,
        "intermediate_size": args.intermediate or 4 * args.hidden,
    }


def ours_overrides(args: argparse.Namespace, seq: int, batch: int, micro: int, corpus: str) -> list[str]:
    """The recipe both sides follow, as key=value overrides of recipes/bert-base.yaml."""
    shape = run_shape(args)
    overrides = [
        f"data.corpus=['{corpus}']",
        "data.validation=['@sample-validation']",  # not used: the child stops before the final evaluation
        f"data.tokenizer={args.tokenizer}",
        f"data.seq_len={seq}",
        f"data.shuffle_buffer={args.shuffle_buffer}",
        *(f"model.{key}={value}" for key, value in shape.items()),
        "mlm.masking=token",  # what DataCollatorForLanguageModeling does
        "mlm.mask_rate=0.15",
        f"optim.batch_size={batch}",
        f"optim.micro_batch_size={micro}",
        f"max_steps={args.warmup + args.steps}",
        f"impl.mixed_precision='{args.precision if args.precision == 'bf16' else 'no'}'",
        f"impl.compile={str(args.compile).lower()}",
        f"impl.log_every={math.gcd(args.warmup, args.steps)}",
        "impl.eval_every=1000000000",
        "impl.save_every=1000000000",
        f"impl.eval_blocks={micro}",
        "impl.progress=false",
    ]
    if args.parallel:
        overrides.append(f"parallel={args.parallel}")
    return [*overrides, *args.override]


def prepare(args: argparse.Namespace, seq: int, batch: int, micro: int, corpus: str) -> dict:
    """The initial weights both sides load, the blocks our stream yields (the HF side's data), FLOPs."""
    import numpy as np
    import torch

    from mlm_pretrain.corpus import TextStream
    from mlm_pretrain.models import build_model
    from mlm_pretrain.objectives.mlm import mask_batch
    from mlm_pretrain.packing import BlockStream, TokenInfo, collate
    from mlm_pretrain.recipe import load_recipe
    from mlm_pretrain.tokenizer import load_tokenizer
    from mlm_pretrain.trainer import PretrainRecipe

    overrides = [o for o in ours_overrides(args, seq, batch, micro, corpus) if not o.startswith("parallel=")]
    recipe = load_recipe(PretrainRecipe, RECIPE, [o for o in overrides if o not in args.override])
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.model, tokenizer, seq)
    init = Path(args.work) / f"init-{seq}"
    model.save_pretrained(init)

    documents = TextStream(
        recipe.data.corpus, text_field=recipe.data.text_field, seed=recipe.seed, epochs=None
    )
    stream = BlockStream(
        documents, tokenizer, seq, shuffle_buffer=recipe.data.shuffle_buffer, seed=recipe.seed
    )
    count = (args.warmup + args.steps) * batch
    started = time.perf_counter()
    blocks = np.stack([block for _, block in zip(range(count), stream, strict=False)])
    stream_seconds = time.perf_counter() - started
    blocks_path = Path(args.work) / f"blocks-{seq}.npy"
    np.save(blocks_path, blocks)

    info = TokenInfo(tokenizer)
    sample = collate(list(blocks[: min(len(blocks), 1024)]), info)
    _, predict = mask_batch(sample, info, recipe.mlm, torch.Generator().manual_seed(0))
    fraction = float(predict.float().mean())
    c = model.config
    L, H, V = c.num_hidden_layers, c.hidden_size, c.vocab_size  # noqa: N806
    encoder = 6 * L * (4 * H**2 + 2 * H * c.intermediate_size)
    attention = 12 * L * seq * H
    head = 6 * (H**2 + H * V)
    return {
        "seq": seq,
        "batch": batch,
        "micro": micro,
        "vocab": V,
        "parameters": sum(p.numel() for p in model.parameters()),
        "masked_fraction": fraction,
        "flops_per_token": {
            "model": encoder + attention + head,
            "exec_ours": encoder + attention + fraction * head,
            "exec_hf": encoder + attention + head,
            "encoder": encoder,
            "attention": attention,
            "head": head,
        },
        # our stream alone (one CPU process, shuffle-buffer fill included): the rate our data path can feed
        "stream_tokens_per_s": stream.tokens_read / stream_seconds,
        "init": str(init),
        "blocks": str(blocks_path),
        "optim": {
            "lr": recipe.optim.lr,
            "warmup": recipe.optim.warmup,
            "weight_decay": recipe.optim.weight_decay,
            "betas": list(recipe.optim.betas),
            "eps": recipe.optim.eps,
            "clip": recipe.optim.clip,
        },
        "overrides": ours_overrides(args, seq, batch, micro, corpus),
    }


def run_child(args: argparse.Namespace, name: str, job: dict, torchrun: bool) -> dict:
    """Run `bench_gpu.py --side` in a fresh process (under torchrun if asked); its figures, or its error."""
    work = Path(args.work)
    job = {**job, "result": str(work / f"result-{name}.json"), "out": str(work / f"run-{name}")}
    job_path = work / f"job-{name}.json"
    job_path.write_text(json.dumps(job))
    script = [str(Path(__file__).resolve()), "--side", job["side"], "--job", str(job_path)]
    if torchrun:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc}",
        ]
        cmd += script
    else:
        cmd = [sys.executable, *script]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if job["side"] == "hf":
        env.setdefault("TOKENIZERS_PARALLELISM", "false")  # the collator runs in forked workers
    log_path = work / f"log-{name}.txt"
    started = time.perf_counter()
    try:
        with log_path.open("w") as log:
            code = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, timeout=args.side_timeout
            ).returncode
    except subprocess.TimeoutExpired:
        code = f"timeout after {args.side_timeout} s"
    seconds = time.perf_counter() - started
    result = Path(job["result"])
    shutil.rmtree(job["out"], ignore_errors=True)
    if code == 0 and result.is_file():
        return {**json.loads(result.read_text()), "wall_s": seconds}
    text = log_path.read_text(errors="replace")
    tail = text[-6000:]
    # the lines that say why (a recipe error, an exception): torchrun's report can push them out of the tail
    lines = [
        line for line in text.splitlines() if "torch/distributed" not in line and "ChildFailed" not in line
    ]
    reasons = [line for line in lines if "error:" in line.lower() or "exception:" in line.lower()][-6:]
    print(f"  {name} FAILED ({code}); the end of its output:\n{tail}", flush=True)
    if reasons:
        print("  why:\n" + "\n".join(f"    {line}" for line in reasons), flush=True)
    return {"error": f"exit {code}", "reasons": reasons, "log_tail": tail, "wall_s": seconds}


def machine_header(args: argparse.Namespace) -> dict:
    def command(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    cpu = next(
        (line.split(":", 1)[1].strip() for line in command(["lscpu"]).splitlines() if "Model name" in line),
        platform.processor() or "unknown",
    )
    gpu = command(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"])
    import accelerate
    import torch
    import transformers

    import mlm_pretrain

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "nvidia_smi": gpu or "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "mlm_pretrain": mlm_pretrain.__version__,
    }


def memory_cell(row: dict) -> str:
    if row["peak_mem_gb"] is not None:
        return f"{row['peak_mem_gb']:.1f}"
    return f"n/a (RSS {row['peak_rss_mb']:,} MB)"


def spec_peak(args: argparse.Namespace, device_name: str | None) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if args.device != "cuda" or not device_name:
        return None
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key.lower() in device_name.lower()), None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--data", help=f"corpus directory or file [{SHARED_CORPUS} if present, else @sample]")
    parser.add_argument(
        "--tokenizer", default=str(DEFAULT_TOKENIZER), help="tokenizer directory [%(default)s]"
    )
    parser.add_argument(
        "--vocab",
        type=int,
        help="train a WordPiece tokenizer of (at most) this size on --data first and use it instead of "
        "--tokenizer (bert-base: 30522; @sample reaches about 22k)",
    )
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 512], help="sequence lengths")
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 64], help="global batch, per --seq")
    parser.add_argument("--micro-batch", type=int, nargs="+", help="micro-batch per --seq [= --batch]")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per run [%(default)s]")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first [%(default)s]")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of both sides [%(default)s]")
    parser.add_argument("--sides", nargs="+", choices=["ours", "hf"], default=["ours", "hf"])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, help="[hidden / 64]")
    parser.add_argument("--intermediate", type=int, help="[4 x hidden]")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile on both sides [on with CUDA, off on the CPU]",
    )
    parser.add_argument("--parallel", choices=["ddp", "fsdp"], help="our side: recipe override parallel=...")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per side [%(default)s]")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another recipe override for our side only (the shared blocks and FLOP counts ignore it)",
    )
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="blocks [%(default)s]")
    parser.add_argument("--hf-workers", type=int, help="HF dataloader workers [4 with CUDA, 0 on the CPU]")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak [from its name]")
    parser.add_argument("--matmul-n", type=int, help="ceiling matmul size [8192 with CUDA, 1024 on the CPU]")
    parser.add_argument("--matmul-reps", type=int, default=20)
    parser.add_argument("--side-timeout", type=int, default=420, help="seconds per run [%(default)s]")
    parser.add_argument(
        "--out", default=str(ROOT / "runs" / "bench_gpu.json"), help="results JSON [%(default)s]"
    )
    parser.add_argument("--keep-work", action="store_true", help="keep the work directory (logs, blocks)")
    parser.add_argument("--side", choices=["ours", "hf", "ceiling"], help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        job = json.loads(Path(args.job).read_text())
        {"ours": side_ours, "hf": side_hf, "ceiling": side_ceiling}[args.side](job)
        return

    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    args.batch = per_seq(args.batch, args.seq, "--batch", parser)
    args.micro_batch = per_seq(args.micro_batch, args.seq, "--micro-batch", parser) or args.batch
    for batch, micro in zip(args.batch, args.micro_batch, strict=True):
        if batch % (micro * args.nproc):
            parser.error(f"batch {batch} is not a multiple of micro-batch {micro} x {args.nproc} processes")

    import torch

    if args.device == "auto":
        if not torch.cuda.is_available():
            print("no CUDA device: nothing measured (--device cpu runs a CPU smoke test)")
            return
        args.device = "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"--device cuda: no CUDA device visible to torch {torch.__version__}", file=sys.stderr)
        sys.exit(2)
    cuda = args.device == "cuda"
    if args.compile is None:
        args.compile = cuda
    if args.hf_workers is None:
        args.hf_workers = 4 if cuda else 0
    args.matmul_n = args.matmul_n or (8192 if cuda else 1024)
    corpus = args.data or (str(SHARED_CORPUS) if SHARED_CORPUS.is_dir() else "@sample")
    if not corpus.startswith("@"):  # the children run in the checkout's root
        corpus = str(Path(corpus).resolve())
    args.tokenizer = str(Path(args.tokenizer).resolve())

    started = time.perf_counter()
    header = machine_header(args)
    args.work = tempfile.mkdtemp(prefix="bench_gpu_")
    failed = False
    try:
        if args.vocab:
            args.tokenizer = str(Path(args.work) / f"wordpiece-{args.vocab}")
            train = ["tokenizer", "--corpus", corpus, "--vocab-size", str(args.vocab), "--min-frequency", "1"]
            command = [sys.executable, "-m", "mlm_pretrain", *train, "--out", args.tokenizer]
            subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        print(f"{header['date']}: preparing initial weights and blocks in {args.work}", flush=True)
        preps = {
            seq: prepare(args, seq, batch, micro, corpus)
            for seq, batch, micro in zip(args.seq, args.batch, args.micro_batch, strict=True)
        }
        results, failed = run_rounds(args, preps)
    finally:
        if not args.keep_work:
            shutil.rmtree(args.work, ignore_errors=True)
    report(args, header, corpus, preps, results, time.perf_counter() - started)
    sys.exit(1 if failed else 0)


def run_rounds(args: argparse.Namespace, preps: dict) -> tuple[dict, bool]:
    torchrun_ours = args.nproc > 1 or args.parallel is not None
    common = {
        "device": args.device,
        "warmup": args.warmup,
        "steps": args.steps,
        "log_every": math.gcd(args.warmup, args.steps),
        "precision": args.precision,
        "compile": args.compile,
        "tokenizer": args.tokenizer,
        "hf_workers": args.hf_workers,
    }
    results: dict = {"ceiling": [], **{(seq, side): [] for seq in args.seq for side in args.sides}}
    failed = False
    for round_ in range(args.rounds):
        job = {
            "side": "ceiling",
            "device": args.device,
            "matmul_n": args.matmul_n,
            "matmul_reps": args.matmul_reps,
        }
        ceiling = run_child(args, f"ceiling-{round_}", job, False)
        results["ceiling"].append(ceiling)
        if "error" not in ceiling:
            print(
                f"round {round_ + 1}/{args.rounds} bf16 matmul {ceiling['n']}^3: "
                f"best {ceiling['best_tflops']:,.1f} TFLOP/s, median {ceiling['median_tflops']:,.1f}",
                flush=True,
            )
        for index, seq in enumerate(args.seq):
            prep = preps[seq]
            order = list(args.sides) if (round_ + index) % 2 == 0 else list(reversed(args.sides))
            for side in order:
                job = {
                    **common,
                    "side": side,
                    "seq": seq,
                    "batch": prep["batch"],
                    "micro": prep["micro"],
                    "init": prep["init"],
                    "blocks": prep["blocks"],
                    "optim": prep["optim"],
                    "overrides": [*prep["overrides"], f"model.init_from={prep['init']}"],
                }
                torchrun = torchrun_ours if side == "ours" else args.nproc > 1
                figures = run_child(args, f"{side}-{seq}-{round_}", job, torchrun)
                results[seq, side].append(figures)
                failed = failed or "error" in figures
                if "error" not in figures:
                    memory = figures["peak_mem_gb"]
                    print(
                        f"round {round_ + 1}/{args.rounds} seq {seq:>4} {side:>4}: "
                        f"{figures['tokens_per_s']:,.0f} tokens/s, "
                        + (f"peak GPU memory {memory:.1f} GB, " if memory is not None else "")
                        + f"start-up {figures['startup_s']:.0f} s, run {figures['wall_s']:.0f} s",
                        flush=True,
                    )
    return results, failed


def report(args, header: dict, corpus: str, preps: dict, results: dict, seconds: float) -> dict:
    ceilings = [r for r in results["ceiling"] if "error" not in r]
    ceiling = max((r["best_tflops"] for r in ceilings), default=None)
    device_name = ceilings[0].get("device_name") if ceilings else None
    peak = spec_peak(args, device_name)

    def pct(tokens_per_s: float, flops: float, tflops: float | None) -> str:
        return "n/a" if not tflops else f"{100 * tokens_per_s * flops / (tflops * 1e12):.1f}%"

    rows, summary = [], []
    for seq in args.seq:
        prep = preps[seq]
        flops = prep["flops_per_token"]
        ok = {side: [r for r in results[seq, side] if "error" not in r] for side in args.sides}
        speed = {
            side: statistics.median(r["tokens_per_s"] for r in runs) for side, runs in ok.items() if runs
        }
        ratios = []
        if "ours" in args.sides and "hf" in args.sides:
            pairs = zip(results[seq, "ours"], results[seq, "hf"], strict=True)
            ratios = [
                o["tokens_per_s"] / h["tokens_per_s"]
                for o, h in pairs
                if "error" not in o and "error" not in h
            ]
        for side in args.sides:
            if side not in speed:
                rows.append([seq, side, prep["batch"], "failed", *["-"] * 7])
                summary.append({"seq": seq, "side": side, "error": results[seq, side][-1].get("error")})
                continue
            runs, tokens = ok[side], speed[side]
            exec_flops = flops["exec_ours" if side == "ours" else "exec_hf"]
            if side == "ours" and ratios:
                ratio = statistics.median(ratios)
                vs = f"{ratio:.2f}× faster" if ratio >= 1 else f"{1 / ratio:.2f}× slower"
                if len(ratios) > 1:
                    vs += f" ({min(ratios):.2f}-{max(ratios):.2f})"
            else:
                vs = "1.00×" if side == "hf" and ratios else "-"
            memory = [r["peak_mem_gb"] for r in runs if r.get("peak_mem_gb") is not None]
            trainer_speed = [r["trainer_tokens_per_s"] for r in runs if r.get("trainer_tokens_per_s")]
            losses = [r["losses"][-1] for r in runs if r.get("losses")]
            row = {
                "seq": seq,
                "side": side,
                "batch": prep["batch"],
                "tokens_per_s": tokens,
                "ratio_ours_over_hf": statistics.median(ratios) if ratios else None,
                "mfu_spec": tokens * flops["model"] / (peak * 1e12) if peak else None,
                "mfu_matmul": tokens * flops["model"] / (ceiling * 1e12) if ceiling else None,
                "exec_mfu_spec": tokens * exec_flops / (peak * 1e12) if peak else None,
                "exec_mfu_matmul": tokens * exec_flops / (ceiling * 1e12) if ceiling else None,
                "peak_mem_gb": max(memory) if memory else None,
                "peak_rss_mb": max(r["rss_mb"] for r in runs),
                "trainer_tokens_per_s": statistics.median(trainer_speed) if trainer_speed else None,
                "last_loss": statistics.median(losses) if losses else None,
            }
            summary.append(row)
            rows.append(
                [
                    seq,
                    side,
                    prep["batch"],
                    tokens,
                    vs,
                    pct(tokens, flops["model"], peak),
                    pct(tokens, flops["model"], ceiling),
                    pct(tokens, exec_flops, peak),
                    pct(tokens, exec_flops, ceiling),
                    memory_cell(row),
                    f"{row['last_loss']:.3f}" if row["last_loss"] is not None else "-",
                ]
            )

    shape = run_shape(args)
    first = preps[args.seq[0]]
    print()
    print(f"# {header['date']}; CPU: {header['cpu']} ({header['cpu_count']} cores)")
    print(f"# nvidia-smi: {' | '.join(header['nvidia_smi'].splitlines())}")
    print(
        f"# python {header['python']}, torch {header['torch']}, transformers {header['transformers']}, "
        f"accelerate {header['accelerate']}, mlm_pretrain {header['mlm_pretrain']}"
    )
    compiled = "on" if args.compile else "off"
    parallel = f", ours parallel={args.parallel}" if args.parallel else ""
    print(
        f"BERT {shape['num_layers']}x{shape['hidden_size']} ({shape['num_heads']} heads, intermediate "
        f"{shape['intermediate_size']}), vocab {first['vocab']:,} ({args.tokenizer}), "
        f"{first['parameters'] / 1e6:.1f}M parameters; {args.precision}, compile {compiled}{parallel}, "
        f"{args.nproc} process(es) per side; data {corpus}"
    )
    print(
        f"{args.rounds} round(s) of {args.warmup} untimed + {args.steps} timed steps per run; "
        "tokens/s: medians over rounds"
    )
    spec = f"{peak:,.1f} TFLOP/s dense bf16 ({device_name or 'given'})" if peak else "n/a"
    achieved = f"{ceiling:,.1f} TFLOP/s (best bf16 {args.matmul_n}^3)" if ceiling else "n/a"
    print(f"spec peak: {spec}; matmul ceiling: {achieved}")
    for seq in args.seq:
        prep = preps[seq]
        g = {k: v / 1e9 for k, v in prep["flops_per_token"].items()}
        print(
            f"seq {seq}: batch {prep['batch']} (micro {prep['micro']}); GFLOP/token: model {g['model']:.3f} "
            f"(encoder {g['encoder']:.3f}, attention {g['attention']:.3f}, head {g['head']:.3f}), executed: "
            f"ours {g['exec_ours']:.3f} (head at {100 * prep['masked_fraction']:.1f}% of tokens), "
            f"HF {g['exec_hf']:.3f}; our stream alone: {prep['stream_tokens_per_s']:,.0f} tokens/s "
            "(one CPU process)"
        )
    header_row = ["seq", "side", "batch", "tokens/s", "ours vs HF", "MFU spec", "MFU matmul"]
    header_row += ["exec MFU spec", "exec MFU matmul", "peak GPU mem GB", "last loss"]
    print(table(header_row, rows))
    print(
        "MFU: model FLOPs (head at every position, both sides); exec MFU: the FLOPs each side runs "
        "(ours: head at masked positions only). peak GPU mem: torch.cuda.max_memory_allocated in each run."
    )
    if args.nproc > 1 and "hf" in args.sides:
        print(
            "last loss: HF's as it logs it; under DDP, transformers 5 logs it multiplied by the process count"
        )
    print(f"bench took {seconds / 60:.1f} minutes")

    document = {
        "header": header,
        "args": {k: v for k, v in vars(args).items() if k not in ("work", "side", "job")},
        "corpus": corpus,
        "model": shape,
        "spec_peak_tflops": peak,
        "matmul_ceiling_tflops": ceiling,
        "prep": {
            str(s): {k: v for k, v in p.items() if k not in ("init", "blocks")} for s, p in preps.items()
        },
        "summary": summary,
        "runs": {
            "ceiling": results["ceiling"],
            **{f"{seq}/{side}": results[seq, side] for seq in args.seq for side in args.sides},
        },
        "seconds": seconds,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(document, indent=1))
    print(f"results written to {args.out}")
    return document


if __name__ == "__main__":
    main()
