"""Fraction of predictions equal to the reference labels.

A local `evaluate` module shipped with mlm-pretrain, so `evaluate.load(<this directory>)` works offline
(`evaluate.load("accuracy")` would fetch the script from the Hub).
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score


class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to the reference labels.",
            citation="",
            inputs_description="predictions and references: lists of labels",
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, sample_weight=None) -> dict:
        return {"accuracy": float(accuracy_score(references, predictions, sample_weight=sample_weight))}
