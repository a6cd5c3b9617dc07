"""F1 score of the positive class (binary) or averaged over classes (`average=`).

A local `evaluate` module shipped with mlm-pretrain, so `evaluate.load(<this directory>)` works offline
(`evaluate.load("f1")` would fetch the script from the Hub).
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import f1_score


class F1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="F1 score of the positive class (binary) or averaged over classes (`average=`).",
            citation="",
            inputs_description="predictions and references: lists of labels",
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary") -> dict:
        score = f1_score(references, predictions, labels=labels, pos_label=pos_label, average=average)
        return {"f1": float(score) if np.ndim(score) == 0 else np.asarray(score).tolist()}
