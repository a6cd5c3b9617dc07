"""What a run records: a JSONL metrics file, TensorBoard through accelerate's trackers, a loss curve."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

from mlm_pretrain.checkpoint import disk_full_error, is_disk_full

log = logging.getLogger(__name__)

DISK_FULL_ADVICE = "free some space and continue with --resume"


class RunLog:
    """Appends metric records to `metrics.jsonl` and the trackers (main process only).

    The file is strict JSON, one record a line: a NaN or infinite value (a diverging loss) is written
    as null, where `json.dumps` would write the bare `NaN` that strict readers reject.
    """

    def __init__(self, run_dir: Path, accelerator, config: dict, resumed_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        if self.enabled and self.path.exists():
            # a resumed run rewrites what came after its checkpoint, so the file has each step once
            kept = [line for line, record in _records(self.path) if record.get("step", 0) <= resumed_step]
            self._replace("".join(line + "\n" for line in kept))
        accelerator.init_trackers("tensorboard", config=_flat(config))

    def log(self, step: int, **metrics: float) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **{k: _finite(v) for k, v in metrics.items()}}
        line = json.dumps(record, allow_nan=False) + "\n"
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with self.path.open("a") as f:
                f.write(line)
        except OSError as err:
            if self.path.exists():
                os.truncate(self.path, size)  # no half line for the next reader to trip on
            if is_disk_full(err):
                raise disk_full_error(self.path, DISK_FULL_ADVICE) from err
            raise
        # TensorBoard gets NaN and inf as they are: its event files hold them, and its plot shows where
        # the run diverged
        self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def _replace(self, text: str) -> None:
        """Rewrite the file through a temporary one, so that a crash or a full disk loses no record."""
        partial = self.path.with_name(self.path.name + ".partial")
        try:
            partial.write_text(text)
            partial.replace(self.path)
        except OSError as err:
            partial.unlink(missing_ok=True)
            if is_disk_full(err):
                raise disk_full_error(self.path, DISK_FULL_ADVICE) from err
            raise

    def close(self) -> None:
        self.accelerator.end_training()
        if self.enabled:
            plot_loss_curve(self.path, self.path.parent / "loss_curve.png")


def plot_loss_curve(metrics_file: Path, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [record for _, record in _records(metrics_file)]
    # a null (a diverged step) leaves a gap in the curve, as matplotlib reads it as NaN
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train MLM loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="validation MLM loss (per token)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _flat(config: dict, prefix: str = "") -> dict:
    """TensorBoard's hparams take scalars and strings only."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def _records(metrics_file: Path) -> Iterator[tuple[str, dict]]:
    """(line, record) for each line of a metrics file that holds a record. A line a crash cut short is
    skipped with a warning."""
    for number, line in enumerate(metrics_file.read_text().splitlines(), 1):
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            log.warning(
                "%s line %d is not a JSON record (cut short by a crash?): skipped", metrics_file, number
            )
            continue
        yield line, record


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value
