"""How every benchmark measures: the machine line, the step clock, matmul ceilings, FLOPs per token and MFU,
memory and CPU time. One definition of each, so two tables never count differently."""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

# the CPU features that decide how fast bf16 runs here (AMX or AVX512-BF16: native; else emulated)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
# dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s; the first match wins
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


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """`lscpu`'s model name and flags (/proc/cpuinfo's where lscpu is missing)."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        return fields.get("Model name", "unknown"), set(fields.get("Flags", "").split())
    except (OSError, subprocess.CalledProcessError):
        model, flags = "unknown", set()
        cpuinfo = Path("/proc/cpuinfo")
        for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
        return model, flags


def machine() -> str:
    """One line for a benchmark's header: CPU model and the flags that matter, the CPUs this process may
    use, the load, the GPU if torch sees one, torch's version. Machines here differ (AMX or not), so every
    table carries it."""
    import torch

    model, flags = cpu_model_and_flags()
    present = " ".join(flag for flag in CPU_FLAGS if flag in flags) or "none of " + "/".join(CPU_FLAGS)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"machine: {model} (flags: {present}), {cpus} of {os.cpu_count()} CPUs, load {load}{gpu}; "
        f"torch {torch.__version__}"
    )


class Clock:
    """Wall-clock and CPU time at chosen training steps; on a GPU each tick waits for the queued work."""

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda
        self.start = time.perf_counter()
        self.wall: dict[int, float] = {}
        self.cpu: dict[int, float] = {}

    def tick(self, step: int) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.wall[step], self.cpu[step] = time.perf_counter(), time.process_time()

    def speeds(self, tokens_per_step: int, warmup: int) -> dict:
        """Tokens per second and per CPU-second from the tick at step `warmup` to the last, and the
        seconds before it (imports, build, compilation, the warmup steps)."""
        last = max(self.wall)
        tokens = (last - warmup) * tokens_per_step
        return {
            "tokens_per_s": tokens / (self.wall[last] - self.wall[warmup]),
            "tokens_per_cpu_s": tokens / (self.cpu[last] - self.cpu[warmup]),
            "startup_s": self.wall[warmup] - self.start,
        }


def call_rates(
    product: Callable[[], object], flops: float, calls: int, cuda: bool = False
) -> tuple[float, float]:
    """The best and the median rate, in FLOP/s, of `calls` timed calls of `product` (after one untimed),
    each doing `flops`."""
    import torch

    def wait() -> None:
        if cuda:
            torch.cuda.synchronize()

    product()
    wait()
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        product()
        wait()
        seconds.append(time.perf_counter() - start)
    return flops / min(seconds), flops / statistics.median(seconds)


def matmul_flops(dtype, n: int = 2048, calls: int = 9, device: str = "cpu") -> tuple[float, float]:
    """The best and the median rate of `calls` n^3 `torch.matmul`s in `dtype` (after one untimed), in
    FLOP/s: the ceilings MFU is measured against. On these CPUs bf16 is fast only with AMX or AVX512-BF16.
    Both, because on the 2-core KVM guests here the bf16 rate switches between two states (~450-650 and
    1,300-1,900 GFLOP/s) from one call to the next: the best call measures the fast state whenever one call
    falls in it, the median comes nearer the rate a seconds-long training step gets."""
    import torch

    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    return call_rates(lambda: torch.matmul(a, b), 2 * n**3, calls, cuda=device == "cuda")


def flops_per_token(config, seq_len: int, masked_fraction: float) -> dict[str, float]:
    """Training FLOPs per token of an HF BERT-style config (matmuls, 2 per multiply-add, x3 for forward and
    backward; embedding lookups not counted):
        encoder    6 L (4 H^2 + 2 H I)     every position, both sides
        attention  12 L S H                (QK^T and AV at sequence length S), both sides
        head       6 (H^2 + H V)           transform + vocabulary decoder
    `model` counts the head at every position (the usual count: MFU ratios equal tokens/s ratios);
    `exec_hf` is what HF's dense head runs (the same), `exec_ours` what our sparse head runs: the head at
    the masked fraction of the tokens only."""
    c = config
    encoder = 6 * c.num_hidden_layers * (4 * c.hidden_size**2 + 2 * c.hidden_size * c.intermediate_size)
    attention = 12 * c.num_hidden_layers * seq_len * c.hidden_size
    head = 6 * (c.hidden_size**2 + c.hidden_size * c.vocab_size)
    return {
        "encoder": encoder,
        "attention": attention,
        "head": head,
        "model": encoder + attention + head,
        "exec_hf": encoder + attention + head,
        "exec_ours": encoder + attention + masked_fraction * head,
    }


def mfu(tokens_per_s: float, flops: float, flops_per_s: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over a ceiling (None where there is none)."""
    return tokens_per_s * flops / flops_per_s if flops_per_s else None


def spec_peak_tflops(device_name: str | None) -> float | None:
    """The GPU's dense bf16 peak from its data sheet, by name; None for a GPU not listed."""
    if not device_name:
        return None
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key.lower() in device_name.lower()), None)


def peak_memory() -> dict[str, float | None]:
    """Peak RSS of this process and of its largest child (e.g. a `datasets.map` worker), in MB, and the peak
    CUDA memory allocated, in GB, where a GPU was used."""
    import torch

    figures: dict[str, float | None] = {
        "rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "child_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
        "peak_gpu_gb": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        figures["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return figures


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children so far: under other people's load,
    tokens per CPU-second compare sides more steadily than tokens per wall-clock second."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
