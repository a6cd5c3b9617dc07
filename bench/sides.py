"""Running the sides of a comparison and printing them: one side per process, its figures read back, tables;
and the smoke data every `--smoke` run uses.

A side is `python -m bench.<script> --side NAME ...`; it prints one line at its end (`report`) carrying
its figures and its own peak memory, so each side's memory is its own and not the parent's. A smoke run
calls the same `main` in-process instead (`inline`): the same code, without a second interpreter start.
"""

from __future__ import annotations

import atexit
import contextlib
import gzip
import importlib
import io
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.measure import peak_memory

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = str(ROOT.parent / "shared" / "data")
RESULTS = ROOT / "bench" / "results"
MARK = "BENCH-RESULT "
# recipes/cpu-cram.yaml cut to seconds on the smoke data (with its corpus and validation): smoke runs' model
# (BERT: HF's ModernBERT compiles itself on first use, which alone takes longer than a smoke run should)
SMOKE_CRAM = [
    "data.tokenizer=tokenizers/default-wordpiece-8k", "model.type=bert", "model.hidden_size=64",
    "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=128", "optim.batch_size=8",
    "optim.micro_batch_size=8",
    "impl.compile=false", "impl.mixed_precision='no'", "impl.eval_blocks=8", "impl.log_with=[]",
    "impl.progress=false",
]  # fmt: skip


def report(figures: dict) -> None:
    """Print a side's figures, with its peak memory, as the line `run_side` reads."""
    print(MARK + json.dumps({**figures, **peak_memory()}), flush=True)


def run_side(
    script: str,
    side: str,
    args: Sequence[str],
    *,
    env: dict | None = None,
    launcher: Sequence[str] = (),
    inline: bool = False,
    timeout: float | None = None,
    tolerate: bool = False,
) -> dict:
    """Run `python -m bench.<script> --side <side> args...` in a fresh interpreter (under `launcher`, e.g.
    torchrun's arguments, if given) and return the figures it reported. `inline` calls the script's `main`
    in this process instead. A failed side ends the benchmark, or with `tolerate` comes back as
    {"error": ...} so that the other sides are still measured."""
    argv = ["--side", side, *args]
    if inline:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            importlib.import_module(f"bench.{script}").main(argv)
        lines, tail, code = out.getvalue().splitlines(), out.getvalue()[-4000:], 0
    else:
        head = [sys.executable, *(["-m", "torch.distributed.run", *launcher] if launcher else [])]
        cmd = [*head, "-m", f"bench.{script}", *argv]
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout, check=False
            )
            lines, code = done.stdout.splitlines(), done.returncode
            tail = f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        except subprocess.TimeoutExpired as timed_out:
            lines, code, tail = [], f"timeout after {timeout} s", str(timed_out.stderr or "")[-4000:]
    found = [line for line in lines if line.startswith(MARK)]
    if code == 0 and found:
        return json.loads(found[-1][len(MARK) :])
    message = f"bench.{script} --side {side} failed ({code}):\n{tail}"
    if tolerate:
        print(message, flush=True)
        return {"error": f"exit {code}", "log_tail": tail}
    sys.exit(message)


def mlm_pretrain(argv: Sequence[str], *, inline: bool = False, log: Path | None = None) -> int:
    """Run the command line `python -m mlm_pretrain argv...` from the checkout's root, its output to `log`
    if given, and return its exit status; `inline` calls the same `main` in this process (a smoke run's
    way to skip an interpreter start)."""
    if inline:
        from mlm_pretrain.cli import main

        return main(list(argv))
    with open(log, "w") if log else contextlib.nullcontext() as sink:
        command = [sys.executable, "-m", "mlm_pretrain", *argv]
        done = subprocess.run(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, check=False)
        return done.returncode


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def direction(ratio: float, peer: str) -> str:
    """A speed ratio (ours / peer, higher = ours faster) in words that say its direction."""
    if ratio >= 1:
        return f"ours {ratio:.2f}x faster than {peer}"
    return f"ours {1 / ratio:.2f}x slower than {peer} (takes {1 / ratio:.2f}x its time)"


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


def pyplot():
    """matplotlib's pyplot, drawing to files only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, png: str | Path, title: str) -> None:
    """Title a figure (the machine, e.g. the head of `measure.machine()`), lay it out and write it."""
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    print(f"wrote {png}")


def stream_arguments(parser) -> None:
    """The options of a benchmark of our stream: the data directory, the tokenizer, the block length."""
    parser.add_argument("--data", default=DEFAULT_DATA, help="a directory with corpus/ [../shared/data]")
    parser.add_argument("--tokenizer", default=str(ROOT / "tokenizers" / "default-wordpiece-8k"))
    parser.add_argument("--seq-len", type=int, default=128)


def smoke_data() -> Path:
    """A copy of `../shared/data`'s layout cut from what the repository ships, in a temporary directory
    removed when this process exits: corpus/ (a .txt and a .jsonl.gz), validation/corpus_validation.jsonl,
    tasks/ (rt_sentiment, trec, stsb: the tests' samples) and word_vectors_eval/. A few hundred KB: a smoke
    run reads all of it in seconds."""
    package = ROOT / "mlm_pretrain" / "data"
    data = Path(tempfile.mkdtemp(prefix="bench-smoke-"))
    atexit.register(shutil.rmtree, data, ignore_errors=True)
    (data / "corpus").mkdir()
    (data / "validation").mkdir()
    shutil.copy(ROOT / "tests" / "data" / "austen_8k.txt", data / "corpus" / "austen.txt")
    records = (package / "validation.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    with gzip.open(data / "corpus" / "moby.jsonl.gz", "wt", encoding="utf-8") as sink:
        sink.writelines(records[:100])
    (data / "validation" / "corpus_validation.jsonl").write_text("".join(records[100:]), encoding="utf-8")
    shutil.copytree(ROOT / "tests" / "data" / "tasks", data / "tasks")
    shutil.copytree(package / "word_vectors_eval", data / "word_vectors_eval")
    return data
