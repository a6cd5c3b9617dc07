"""What a run records: a JSONL metrics file, accelerate's trackers (TensorBoard by default), a loss curve.

`impl.log_with` names the trackers, as accelerate spells them: `tensorboard` writes event files under
`<run>/tensorboard/`; `mlflow`, `wandb` and `trackio` log to the project (MLflow: experiment)
`mlm-pretrain`, in a run named after the run directory; accelerate's others get the project name. Each
gets the recipe, the vocabulary size and the corpus as the run's config, every metric as it is logged
and, where it keeps files (MLflow, W&B), the loss curve at the end. A resumed run is a new tracker run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from mlm_pretrain.checkpoint import disk_full_error, is_disk_full
from mlm_pretrain.errors import InputError

log = logging.getLogger(__name__)

DISK_FULL_ADVICE = "free some space and continue with --resume"
PROJECT = "mlm-pretrain"  # the MLflow experiment (unless MLFLOW_EXPERIMENT_NAME says), W&B/Trackio project
# trackers whose package an extra of ours installs; accelerate's others name their own package
EXTRAS = ("mlflow", "wandb", "trackio")


def check_tracker_names(names: Sequence[str]) -> None:
    """A ValueError for a name accelerate has no tracker of (the recipe checks its `impl.log_with`)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(
                f"impl.log_with: unknown tracker {name!r}; valid: {', '.join(LOGGER_TYPE_TO_CLASS)}"
            )


def trackers(names: Sequence[str], run_dir: Path) -> list:
    """accelerate's `log_with` for these tracker names. A tracker whose package is missing is an
    InputError naming what to install, raised before any training (accelerate would drop it silently)."""
    from accelerate.tracking import TensorBoardTracker, get_available_trackers

    names = list(dict.fromkeys(names))
    check_tracker_names(names)
    available = {str(kind) for kind in get_available_trackers()}
    for name in names:
        if name not in available:
            install = f'"mlm-pretrain[{name}]"' if name in EXTRAS else name
            raise InputError(f"impl.log_with: the {name} tracker needs its package: pip install {install}")
    # our own TensorBoard tracker, so its files stay in <run>/tensorboard whatever the project is called
    return [TensorBoardTracker("tensorboard", run_dir) if name == "tensorboard" else name for name in names]


def run_config(recipe: dict, vocab_size: int) -> dict:
    """The run's config for the trackers: the recipe, flattened to dotted keys, with the vocabulary size
    (the tokenizer's; word2vec's words) and one line describing the corpus."""
    config = _flat(recipe)
    config["vocab_size"] = vocab_size
    config["data.sources"] = "; ".join(_describe_source(s) for s in recipe.get("data", {}).get("corpus", []))
    return config


class RunLog:
    """Appends metric records to `metrics.jsonl` and the trackers (main process only).

    The file is strict JSON, one record a line: a NaN or infinite value (a diverging loss) is written
    as null, where `json.dumps` would write the bare `NaN` that strict readers reject.
    """

    def __init__(self, run_dir: Path, accelerator, config: dict, resumed_step: int = 0):
        """`config` (`run_config`'s) goes to the trackers as the run's config."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        if self.enabled and self.path.exists():
            # a resumed run rewrites what came after its checkpoint, so the file has each step once
            kept = [line for line, record in _records(self.path) if record.get("step", 0) <= resumed_step]
            self._replace("".join(line + "\n" for line in kept))
        name = Path(run_dir).resolve().name
        # W&B keeps its files in the run directory too, unless WANDB_DIR says where
        wandb_dir = {} if "WANDB_DIR" in os.environ else {"dir": str(run_dir)}
        try:
            accelerator.init_trackers(
                PROJECT,
                config=config,
                init_kwargs={
                    "mlflow": {"run_name": name},
                    "wandb": {"name": name, **wandb_dir},
                    "trackio": {"name": name},
                },
            )
        except Exception as err:  # each tracker has its own errors (a store refused, no login): say which
            names = ", ".join(str(t) if isinstance(t, str) else t.name for t in accelerator.log_with)
            raise InputError(
                f"impl.log_with: the trackers ({names}) failed to start: {type(err).__name__}: {err}"
            ) from err

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
        # the trackers get NaN and inf as they are: TensorBoard's event files hold them, and its plot
        # shows where the run diverged
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
        if self.enabled and self.path.exists():  # a run stopped before its first record has none
            curve = plot_loss_curve(self.path, self.path.parent / "loss_curve.png")
            if curve is not None:
                self._log_file(curve)
        self.accelerator.end_training()

    def _log_file(self, path: Path) -> None:
        """`path` as an artefact of the trackers that keep files (TensorBoard has the curve already)."""
        for tracker in self.accelerator.trackers:
            if tracker.name == "mlflow":
                tracker.log_artifact(str(path))
            elif tracker.name == "wandb":
                import wandb

                tracker.tracker.log({path.stem: wandb.Image(str(path))})


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


def _describe_source(source: str | dict) -> str:
    if isinstance(source, str):
        return source
    extras = ", ".join(f"{k} {v}" for k, v in source.items() if k != "path")
    return f"{source.get('path')}{f' ({extras})' if extras else ''}"


def _flat(config: dict, prefix: str = "") -> dict:
    """Trackers' configs take scalars and strings only (TensorBoard's hparams, MLflow's params)."""
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
