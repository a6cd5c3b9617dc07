"""What a run records: a JSONL metrics file, TensorBoard through accelerate's trackers, a loss curve."""

from __future__ import annotations

import json
import time
from pathlib import Path


class RunLog:
    """Appends metric records to `metrics.jsonl` and the trackers (main process only)."""

    def __init__(self, run_dir: Path, accelerator, config: dict, resumed_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        if self.enabled and self.path.exists():
            # a resumed run rewrites what came after its checkpoint, so the file has each step once
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line and json.loads(line).get("step", 0) <= resumed_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        accelerator.init_trackers("tensorboard", config=_flat(config))

    def log(self, step: int, **metrics: float) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self.accelerator.end_training()
        if self.enabled:
            plot_loss_curve(self.path, self.path.parent / "loss_curve.png")


def plot_loss_curve(metrics_file: Path, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
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
