"""Task metrics through `evaluate`, loaded from the modules shipped in `mlm_pretrain/metrics/`.

`evaluate.load("accuracy")` fetches a script from the Hub; loading the local module directory works
offline. A task's `score` is the mean of its metrics (GLUE's convention for MRPC, QQP and STS-B).
"""

from __future__ import annotations

import functools
import statistics
from pathlib import Path

from mlm_pretrain.finetune.tasks import Task

METRICS_DIR = Path(__file__).resolve().parent.parent / "metrics"


@functools.cache
def load_metric(name: str):
    import evaluate

    return evaluate.load(str(METRICS_DIR / name))


def score_predictions(task: Task, predictions: list, references: list) -> dict[str, float]:
    """Every metric of the task, and `score`, their mean."""
    values = {}
    for name in task.metrics:
        # Multi-class F1 has no positive class: average the per-class F1s.
        options = {"average": "macro"} if name == "f1" and task.num_labels > 2 else {}
        values.update(load_metric(name).compute(predictions=predictions, references=references, **options))
    values["score"] = statistics.fmean(values[name] for name in task.metrics)
    return values
