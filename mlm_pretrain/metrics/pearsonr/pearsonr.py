"""Pearson correlation coefficient between predictions and references.

A local `evaluate` module shipped with mlm-pretrain, so `evaluate.load(<this directory>)` works offline
(`evaluate.load("pearsonr")` would fetch the script from the Hub).
"""

import datasets
import evaluate
from scipy.stats import pearsonr


class Pearsonr(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Pearson correlation coefficient between predictions and references.",
            citation="",
            inputs_description="predictions and references: lists of scores",
            features=datasets.Features(
                {"predictions": datasets.Value("float32"), "references": datasets.Value("float32")}
            ),
        )

    def _compute(self, predictions, references) -> dict:
        return {"pearsonr": float(pearsonr(references, predictions)[0])}
