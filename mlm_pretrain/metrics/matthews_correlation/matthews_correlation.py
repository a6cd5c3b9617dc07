"""Matthews correlation coefficient, GLUE's CoLA metric.

A local `evaluate` module shipped with mlm-pretrain, so `evaluate.load(<this directory>)` works offline
(`evaluate.load("matthews_correlation")` would fetch the script from the Hub).
"""

import datasets
import evaluate
from sklearn.metrics import matthews_corrcoef


class MatthewsCorrelation(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Matthews correlation coefficient, GLUE's CoLA metric.",
            citation="",
            inputs_description="predictions and references: lists of labels",
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references) -> dict:
        return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
