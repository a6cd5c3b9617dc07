"""Memory per process: FSDP2 against DDP at 2 processes (issue 12).

Each run is the real command, `python -m torch.distributed.run --nproc_per_node 2 ... pretrain` (this script
as the entry point, which calls `mlm_pretrain.cli.main(["pretrain", ...])` as `-m mlm_pretrain` does, with
hooks that only read), on `recipes/bert-base.yaml` cut to seq 128, a micro batch of 4 blocks per process,
fp32, a few steps, no evaluation or checkpoint until the end (the trainer always evaluates, checkpoints
and exports once when it finishes). Runs alternate DDP, FSDP, DDP, FSDP. Per process it reports:

1. peak RSS, two ways: `getrusage` inside the worker at the end of the last training step (training only;
   exact, no sampling gap), and polled from outside (psutil over the launcher's process tree every `--poll`
   s, each worker's largest RSS over the whole run: start-up, training, the final evaluation, checkpoint
   and export);
2. model-state bytes: what each process holds of parameters, gradients and AdamW state, measured at the
   optimizer step (an optimizer step pre-hook sums `p.to_local()` bytes of every parameter and gradient,
   a post-hook those of the state tensors; a DTensor counts its local shard), DDP's gradient buckets (its
   reducer keeps a flat copy of all gradients, `gradient_as_bucket_view` off) apart; and the same
   analytically from the parameter count N: DDP 4N params + 4N grads + 8N moments bytes, FSDP half of that
   plus, during forward and backward, whole copies of the groups being computed;
3. tokens/s, the median of steps 2.. from `metrics.jsonl`: what sharding costs on CPU gloo.

And, to tell the parts of the peak apart: RSS on rank 0 when the model is about to be built (runtime,
tokenizer, process group) and after, and glibc's own count (`mallinfo2`) of the bytes in use and of the
bytes freed but kept, after the last step. glibc raises its mmap threshold each time a large block is
freed (up to 32 MiB), after which blocks of that size come from its heap and stay resident when freed;
`--fixed-mmap-rounds` repeats the pair with `MALLOC_MMAP_THRESHOLD_=131072` (which turns that off: every
block over 128 KiB is mapped and given back on free), to show what the processes need rather than what
the allocator keeps.

    python -m bench.fsdp_memory                            # bert-base 12x768, 16k WordPiece: ~7 minutes
    python -m bench.fsdp_memory --rounds 1 --fixed-mmap-rounds 0 --steps 4
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.measure import machine
from bench.sides import DEFAULT_DATA, ROOT, smoke_data, table

SIZES = {  # name: (layers, hidden, heads, intermediate)
    "tiny": (2, 64, 2, 256),  # --smoke
    "small": (4, 256, 4, 1024),
    "medium": (8, 512, 8, 2048),
    "base": (12, 768, 12, 3072),
    "large": (24, 1024, 16, 4096),
}
PARALLELS = ("ddp", "fsdp")
ALLOCATORS = {"default": {}, "fixed-mmap": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
SEQ_LEN, PROCESSES = 128, 2
MB = 1024 * 1024
STATE_KEYS = ("param_bytes", "grad_bytes", "optim_state_bytes")


def overrides(args: argparse.Namespace, size: str, parallel: str, out: Path) -> list[str]:
    layers, hidden, heads, intermediate = SIZES[size]
    return [
        "--recipe",
        str(ROOT / "recipes" / "bert-base.yaml"),
        f"data.corpus=['{args.data}']",
        f"data.validation=['{args.validation}']",
        f"data.tokenizer={args.tokenizer}",
        f"data.seq_len={SEQ_LEN}",
        "data.shuffle_buffer=1000",
        f"model.num_layers={layers}",
        f"model.hidden_size={hidden}",
        f"model.num_heads={heads}",
        f"model.intermediate_size={intermediate}",
        f"optim.batch_size={args.micro_batch * PROCESSES}",
        f"optim.micro_batch_size={args.micro_batch}",
        f"max_steps={args.steps}",
        "impl.mixed_precision='no'",  # quoted: YAML reads a bare no as false
        f"impl.parallel={parallel}",
        "impl.eval_every=1000000",
        "impl.save_every=1000000",
        "impl.eval_blocks=8",
        "impl.keep_last=1",
        "impl.log_every=1",
        "impl.progress=false",
        f"impl.out={out}",
    ]


# ---------------------------------------------------------------------------------------------- a worker


def rss_now() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks")
        + ("fordblks", "keepcost")
    ]


def malloc_now() -> dict | None:
    """glibc's count over all arenas: bytes in use (heap + mapped blocks) and freed bytes it keeps."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return None  # not glibc, or older than 2.33
    info = libc.mallinfo2()
    return {"in_use": info.uordblks + info.hblkhd, "mapped": info.hblkhd, "free_kept": info.fordblks}


def local_bytes(tensor) -> int:
    """Bytes this process holds of `tensor`: its local shard if it is a DTensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def side_train(args: argparse.Namespace) -> None:
    """One torchrun worker: the real `pretrain` command, with read-only hooks around its pieces."""
    import mlm_pretrain.models as models
    import mlm_pretrain.optim as optim
    import mlm_pretrain.parallel as parallel
    from mlm_pretrain.cli import main

    found: dict = {"rss_at_import": rss_now(), "steps": []}
    wrapped: dict = {}
    build_model, parallelize, build_optimizer = (
        models.build_model,
        parallel.parallelize,
        optim.build_optimizer,
    )

    def build_model_hooked(*a, **kw):
        found["rss_before_build"] = rss_now()
        model = build_model(*a, **kw)
        found["rss_after_build"] = rss_now()
        return model

    def parallelize_hooked(objective, impl, accelerator):
        # the shard groups parallel.py makes: each encoder layer; embeddings with the (tied) head
        layers = parallel.encoder_layers(objective.model)
        groups = [sum(p.numel() for p in layer.parameters()) for layer in layers]
        seen = {id(p) for layer in layers for p in layer.parameters()}
        groups.append(sum(p.numel() for p in objective.parameters() if id(p) not in seen))
        found["group_params"] = groups
        wrapped["module"] = parallelize(objective, impl, accelerator)
        found["rss_after_parallelize"] = rss_now()
        found["malloc_after_parallelize"] = malloc_now()
        return wrapped["module"]

    def before_step(optimizer, *_):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        found["global_numel"] = sum(p.numel() for p in params)  # a DTensor's numel is the whole tensor's
        found["param_bytes"] = sum(local_bytes(p) for p in params)
        found["grad_bytes"] = sum(local_bytes(p.grad) for p in params if p.grad is not None)

    def after_step(optimizer, *_):
        # every step: RSS now and the peak so far (the last step's peak is the training peak: the
        # gradients are dropped after the step, and what follows is the final evaluation and checkpoint)
        found["steps"].append({"rss": rss_now(), "peak": rss_peak(), "malloc": malloc_now()})
        states = optimizer.state.values()
        found["optim_state_bytes"] = sum(
            local_bytes(v) for s in states for v in s.values() if hasattr(v, "numel")
        )
        module = wrapped.get("module")
        if hasattr(module, "_get_ddp_logging_data"):
            data = module._get_ddp_logging_data()
            found["ddp_bucket_bytes"] = sum(int(s) for s in str(data.get("bucket_sizes", "")).split(",") if s)
            found["ddp_gradient_as_bucket_view"] = bool(data.get("gradient_as_bucket_view"))

    def build_optimizer_hooked(*a, **kw):
        optimizer = build_optimizer(*a, **kw)
        optimizer.register_step_pre_hook(before_step)
        optimizer.register_step_post_hook(after_step)
        return optimizer

    models.build_model = build_model_hooked
    parallel.parallelize = parallelize_hooked
    optim.build_optimizer = build_optimizer_hooked
    code = main(["pretrain", *overrides(args, args.size, args.parallel, Path(args.out))])
    found["peak_at_exit"] = rss_peak()
    rank = os.environ.get("RANK", "0")
    (Path(args.work) / f"{args.tag}-rank{rank}.json").write_text(json.dumps(found))
    sys.exit(code)


# ---------------------------------------------------------------------------------------------- the parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_rank(proc) -> int | None:
    """The torchrun rank of a process, None if it is none (yet: a child between fork and exec still has
    the launcher's environment)."""
    rank = proc.environ().get("RANK")
    return int(rank) if rank is not None else None


def run_one(args: argparse.Namespace, size: str, parallel: str, allocator: str, round_: int) -> dict:
    """Launch one 2-process run and poll its process tree; return what it measured."""
    import psutil

    tag = f"{size}-{parallel}-{allocator}-{round_}"
    out = Path(args.work) / tag
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={PROCESSES}"]
    cmd += [f"--master_port={free_port()}", "-m", "bench.fsdp_memory", "--side", "train"]
    cmd += ["--size", size, "--parallel", parallel, "--tag", tag, "--work", args.work, "--out", str(out)]
    cmd += ["--data", args.data, "--validation", args.validation, "--tokenizer", args.tokenizer]
    cmd += ["--steps", str(args.steps), "--micro-batch", str(args.micro_batch)]
    env = {**os.environ, **ALLOCATORS[allocator]}
    log_path = Path(args.work) / f"{tag}.log"
    started = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        launcher = psutil.Process(process.pid)
        ranks: dict[int, int] = {}  # pid -> rank, for the workers found so far
        peaks: dict[int, int] = {}  # rank -> largest RSS seen
        tree_peak = samples = 0
        while process.poll() is None:
            if time.perf_counter() - started > args.timeout:
                os.killpg(process.pid, 9)
                process.wait()
                sys.exit(f"{tag} ran past {args.timeout} s; log: {log_path}")
            total = 0
            try:
                tree = [launcher, *launcher.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for proc in tree:
                try:
                    rss = proc.memory_info().rss
                    if (
                        proc.pid not in ranks
                        and proc.pid != launcher.pid
                        and (rank := worker_rank(proc)) is not None
                    ):
                        ranks[proc.pid] = rank
                except psutil.Error:
                    continue
                total += rss
                if proc.pid in ranks:
                    peaks[ranks[proc.pid]] = max(peaks.get(ranks[proc.pid], 0), rss)
            tree_peak = max(tree_peak, total)
            samples += 1
            time.sleep(args.poll)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({process.returncode}):\n{log_path.read_text()[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    inside = [json.loads((Path(args.work) / f"{tag}-rank{r}.json").read_text()) for r in range(PROCESSES)]
    shutil.rmtree(out, ignore_errors=True)  # a bert-base checkpoint with AdamW state is over a gigabyte
    return {
        "size": size,
        "parallel": parallel,
        "allocator": allocator,
        "round": round_,
        "wall_s": wall,
        "samples": samples,
        "polled_peak_rss": [peaks.get(r, 0) for r in range(PROCESSES)],
        "polled_tree_peak_rss": tree_peak,
        "tokens_per_s": statistics.median(speeds[1:] or speeds),
        "tokens_per_s_steps": speeds,
        "ranks": inside,
    }


def analytic(n: int, groups: list[int]) -> dict:
    """Model-state bytes per process from the parameter count N, fp32 AdamW; and FSDP's whole copies
    in forward and backward: the embeddings + head group (its modules run first and last, so it stays
    gathered through the pass) and two encoder layers (the one computing and the one prefetched)."""
    layer, embeddings = max(groups[:-1]), groups[-1]
    return {
        "ddp": 16 * n,
        "ddp_buckets": 4 * n,
        "fsdp": 16 * n / PROCESSES,
        "fsdp_gathered": 4 * (embeddings + 2 * layer),
    }


def summarize(runs: list[dict], allocators: list[str]) -> tuple[list[list], dict]:
    """The table rows for one size: per allocator, the median over rounds of each figure for DDP, FSDP."""

    def med(parallel: str, allocator: str, pick) -> float | None:
        values = [pick(r) for r in runs if r["parallel"] == parallel and r["allocator"] == allocator]
        return statistics.median(values) if values else None

    first = runs[0]["ranks"][0]
    n, groups = first["global_numel"], first["group_params"]
    theory = analytic(n, groups)
    rows: list[list] = []

    def row(label: str, pick, per_allocator: bool = True, scale: float = MB) -> None:
        cells: list = [label]
        for allocator in allocators:
            if not per_allocator and allocator != allocators[0]:
                cells += ["", "", ""]
                continue
            ddp, fsdp = (med(p, allocator, lambda run, p=p: pick(run, p)) for p in PARALLELS)
            ratio = f"{fsdp / ddp:.2f}x" if ddp else "-"
            cells += [ddp / scale, fsdp / scale, ratio]
        rows.append(cells)

    def rank(key: str, r: int = 0):
        return lambda run, _: run["ranks"][r].get(key, 0)

    def state(r: int):
        return lambda run, _: sum(run["ranks"][r][k] for k in STATE_KEYS)

    def last_step(key: str, r: int = 0):
        return lambda run, _: run["ranks"][r]["steps"][-1][key]

    def malloc(key: str):
        return lambda run, _: (run["ranks"][0]["steps"][-1]["malloc"] or {}).get(key, 0)

    row("parameters (rank 0)", rank("param_bytes"), False)
    row("gradients at the step (rank 0)", rank("grad_bytes"), False)
    row("AdamW moments (rank 0)", rank("optim_state_bytes"), False)
    for r in range(PROCESSES):
        row(f"**model state, measured (rank {r})**", state(r), False)
    row("model state, analytic (16N; 16N/2)", lambda _, p: theory[p], False)
    row("DDP gradient buckets (measured)", rank("ddp_bucket_bytes"), False)
    row(
        "FSDP whole groups gathered in fwd/bwd (analytic)",
        lambda _, p: theory["fsdp_gathered"] * (p == "fsdp"),
        False,
    )
    row("RSS before the model is built (rank 0)", rank("rss_before_build"))
    row("RSS after it is built (rank 0)", rank("rss_after_build"))
    row("RSS after parallelize (rank 0)", rank("rss_after_parallelize"))
    row("RSS after the last optimizer step (rank 0)", last_step("rss"))
    row("  malloc in use then (rank 0)", malloc("in_use"))
    row("  malloc freed but kept then (rank 0)", malloc("free_kept"))
    for r in range(PROCESSES):
        row(f"**peak RSS, training (getrusage, rank {r})**", last_step("peak", r))
    for r in range(PROCESSES):
        row(f"peak RSS, whole run (polled, rank {r})", lambda run, _, r=r: run["polled_peak_rss"][r])
    row("peak RSS, launcher + workers (polled)", lambda run, _: run["polled_tree_peak_rss"])
    row("tokens/s (both processes)", lambda run, _: run["tokens_per_s"], scale=1)
    facts = {
        "n": n,
        "groups": groups,
        "theory": theory,
        **{
            f"{a}_{p}": {
                "state": [med(p, a, lambda run, r=r: state(r)(run, None)) for r in range(PROCESSES)],
                "train_peak": [
                    med(p, a, lambda run, r=r: last_step("peak", r)(run, None)) for r in range(PROCESSES)
                ],
                "tokens_per_s": med(p, a, lambda run: run["tokens_per_s"]),
            }
            for a in allocators
            for p in PARALLELS
        },
    }
    return rows, facts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    corpus = Path(DEFAULT_DATA) / "corpus"
    validation = Path(DEFAULT_DATA) / "validation" / "corpus_validation.jsonl"
    parser.add_argument(
        "--data", default=str(corpus) if corpus.exists() else "@sample", help="corpus [../shared/data/corpus]"
    )
    parser.add_argument(
        "--validation",
        default=str(validation) if validation.exists() else "@sample-validation",
        help="validation corpus (the final evaluation only) [../shared/data/validation/...]",
    )
    parser.add_argument("--tokenizer", default=str(ROOT / "tokenizers" / "shared-wordpiece-16k"))
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["base"])
    parser.add_argument("--rounds", type=int, default=2, help="DDP, FSDP pairs per size, glibc as it is")
    parser.add_argument(
        "--fixed-mmap-rounds", type=int, default=1, help="pairs more with MALLOC_MMAP_THRESHOLD_=131072"
    )
    parser.add_argument("--steps", type=int, default=6, help="training steps per run")
    parser.add_argument("--micro-batch", type=int, default=4, help="blocks per process per step")
    parser.add_argument("--poll", type=float, default=0.05, help="seconds between RSS samples")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one run may take")
    parser.add_argument("--json", default=str(ROOT / "runs" / "bench_memory.json"), help="results file")
    parser.add_argument("--smoke", action="store_true", help="a 2x64 model, 2 steps, one round; seconds")
    parser.add_argument("--side", choices=["train"], help=argparse.SUPPRESS)
    for hidden in ("--size", "--parallel", "--tag", "--work", "--out"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        data = smoke_data()
        args.data, args.validation = str(data / "corpus"), str(data / "validation")
        args.tokenizer, args.sizes = str(ROOT / "tokenizers" / "default-wordpiece-8k"), ["tiny"]
        args.rounds, args.fixed_mmap_rounds, args.steps, args.json = 1, 0, 2, str(data / "fsdp_memory.json")
    if args.side:
        side_train(args)
        return
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    started = time.perf_counter()
    print(machine(), flush=True)
    plan = [("default", r) for r in range(args.rounds)] + [
        ("fixed-mmap", r) for r in range(args.fixed_mmap_rounds)
    ]
    allocators = list(dict.fromkeys(a for a, _ in plan))
    args.work = tempfile.mkdtemp(prefix="bench_memory_")
    runs: dict[str, list[dict]] = {size: [] for size in args.sizes}
    try:
        for size in args.sizes:
            for allocator, round_ in plan:
                for parallel in PARALLELS:
                    run = run_one(args, size, parallel, allocator, round_)
                    runs[size].append(run)
                    state = [sum(r[k] for k in STATE_KEYS) / MB for r in run["ranks"]]
                    train_peak = [r["steps"][-1]["peak"] / MB for r in run["ranks"]]
                    polled = [p / MB for p in run["polled_peak_rss"]]
                    print(
                        f"{size} {allocator} round {round_ + 1} {parallel:>4}: {run['wall_s']:.0f} s, "
                        f"{run['tokens_per_s']:,.0f} tokens/s, model state "
                        f"{' / '.join(f'{s:,.0f}' for s in state)} MB, training peak RSS "
                        f"{' / '.join(f'{p:,.0f}' for p in train_peak)} MB, "
                        f"whole-run peak {' / '.join(f'{p:,.0f}' for p in polled)} MB",
                        flush=True,
                    )
    finally:
        shutil.rmtree(args.work, ignore_errors=True)

    summary = {}
    header = ["per process"]
    for allocator in allocators:
        suffix = "" if allocator == "default" else " (mmap 128K)"
        header += [f"DDP MB{suffix}", f"FSDP MB{suffix}", f"FSDP/DDP{suffix}"]
    for size in args.sizes:
        rows, facts = summarize(runs[size], allocators)
        summary[size] = facts
        layers, hidden, heads, intermediate = SIZES[size]
        n, groups = facts["n"], facts["groups"]
        print()
        print(
            f"{size}: BERT {layers}x{hidden} ({heads} heads, intermediate {intermediate}), "
            f"N = {n:,} parameters, vocab from {Path(args.tokenizer).name}; {PROCESSES} processes x "
            f"{args.micro_batch} blocks x {SEQ_LEN} tokens, fp32, {args.steps} steps, gloo; "
            f"medians of {args.rounds} rounds (glibc default) and {args.fixed_mmap_rounds} "
            f"(MALLOC_MMAP_THRESHOLD_=131072); MB = 2^20 bytes"
        )
        print(
            f"shard groups: {len(groups) - 1} encoder layers of {groups[0]:,} parameters, embeddings + head "
            f"{groups[-1]:,}"
        )
        print(table(header, rows))
        ddp, fsdp = facts["default_ddp"], facts["default_fsdp"]
        print(
            f"FSDP holds {fsdp['state'][0] / ddp['state'][0]:.2f}x the model state of DDP per process "
            f"(rank 1: {fsdp['state'][1] / ddp['state'][1]:.2f}x); its training peak RSS is "
            f"{fsdp['train_peak'][0] / ddp['train_peak'][0]:.2f}x DDP's with glibc as it is",
            end="",
        )
        if "fixed-mmap" in allocators:
            f_ddp, f_fsdp = facts["fixed-mmap_ddp"], facts["fixed-mmap_fsdp"]
            print(
                f", {f_fsdp['train_peak'][0] / f_ddp['train_peak'][0]:.2f}x with the mmap threshold fixed",
                end="",
            )
        print(f"; it runs at {fsdp['tokens_per_s'] / ddp['tokens_per_s']:.2f}x DDP's tokens/s")
    command = " ".join(["python -m bench.fsdp_memory", *sys.argv[1:]])
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n{command}; {stamp}; bench took {(time.perf_counter() - started) / 60:.1f} minutes")
    print(machine())
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {"command": command, "date": stamp, "machine": machine(), "summary": summary, "runs": runs},
            indent=1,
        )
    )
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
