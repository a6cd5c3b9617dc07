"""What the data-spine benchmarks share: run one side in its own process, read its figures, print a table.

A side is `python bench/<script>.py --side NAME ...`; it prints one JSON line at its end (`report`), which
carries its own peak RSS, so each side's memory is its own and not the parent's.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = str(ROOT.parent / "shared" / "data")
MARK = "BENCH-RESULT "


FLAGS_OF_INTEREST = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def machine() -> str:
    """One line for a benchmark's header: the `lscpu` model name, which flags of interest the CPU has,
    the CPUs this process may run on and the load average. Benchmark machines here differ (some have AMX,
    some not), so every table should carry this line."""
    model, flags = "unknown", set()
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        model, flags = fields.get("Model name", model), set(fields.get("Flags", "").split())
    except (OSError, subprocess.CalledProcessError):
        cpuinfo = Path("/proc/cpuinfo")
        for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    present = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in FLAGS_OF_INTEREST)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"machine: lscpu model {model!r}; {present}; {os.cpu_count()} CPUs, this run on CPUs {cpus}; "
        f"load average {load}"
    )


def shape(text: str) -> tuple[int, int]:
    """Layers and hidden size of a LAYERSxHIDDEN string: "4x256" -> (4, 256)."""
    layers, _, hidden = text.partition("x")
    return int(layers), int(hidden)


def matmul_parameters(config) -> tuple[int, int]:
    """(encoder, MLM head) parameters in matmuls of an HF BERT-style config; 6x each is the training FLOPs
    per position it runs at (attention scores left out)."""
    c = config
    encoder = c.num_hidden_layers * (4 * c.hidden_size**2 + 2 * c.hidden_size * c.intermediate_size)
    return encoder, c.hidden_size**2 + c.hidden_size * c.vocab_size


def call_rates(product, flops: float, calls: int) -> tuple[float, float]:
    """The best and the median rate, in FLOP/s, of `calls` timed calls of `product` (after one untimed),
    each doing `flops`."""
    product()
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        product()
        seconds.append(time.perf_counter() - start)
    return flops / min(seconds), flops / statistics.median(seconds)


def matmul_flops(dtype, n: int = 2048, calls: int = 9) -> tuple[float, float]:
    """The best and the median rate of `calls` n^3 `torch.matmul`s in `dtype` (after one untimed), in
    FLOP/s: the ceilings MFU is measured against. On these CPUs bf16 is fast only with AMX or AVX512-BF16.
    Both, because on the 2-core KVM guests here the bf16 rate switches between two states (~450-650 and
    1,300-1,900 GFLOP/s) from one call to the next: the best call measures the fast state whenever one call
    falls in it, the median comes nearer the rate a seconds-long training step gets."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return call_rates(lambda: torch.matmul(a, b), 2 * n**3, calls)


def direction(ratio: float, peer: str) -> str:
    """A speed ratio (ours / peer, higher = ours faster) in words that say its direction."""
    if ratio >= 1:
        return f"ours {ratio:.2f}x faster than {peer}"
    return f"ours {1 / ratio:.2f}x slower than {peer} (takes {1 / ratio:.2f}x its time)"


def peak_rss_mb() -> dict[str, float]:
    """Peak RSS of this process and of its largest child (e.g. a `datasets.map` worker), in MB."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"rss_mb": round(self_kb / 1024), "child_rss_mb": round(child_kb / 1024)}


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children so far: under other people's load,
    tokens per CPU-second compare sides more steadily than tokens per wall-clock second."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def report(figures: dict) -> None:
    """Print a side's figures (with its peak RSS) as the line `run_side` reads."""
    print(MARK + json.dumps({**figures, **peak_rss_mb()}), flush=True)


def run_side(script: str, side: str, args: Sequence[str], env: dict | None = None) -> dict:
    """Run `script --side side args...` in a fresh interpreter and return the figures it reported."""
    cmd = [sys.executable, str(ROOT / "bench" / script), "--side", side, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len(MARK) :])


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def table(header: Sequence[str], rows: list[Sequence]) -> str:
    """A Markdown table, numbers right-aligned with thousands separators."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    return "\n".join(lines)
