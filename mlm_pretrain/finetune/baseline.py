"""The bag-of-words baseline printed beside every fine-tuning score: TF-IDF + logistic regression
(ridge for regression), so a reader sees at once whether pretraining bought anything.

Pair tasks stack four views of the two sentences' TF-IDF vectors, [a, b, a*b, |a-b|]: the product's sum
is their cosine similarity, which carries most of what a bag of words knows about paraphrase and
similarity. The regularisation strength is picked on the validation split, as early stopping is.
"""

from __future__ import annotations

import math

from mlm_pretrain.finetune.scoring import score_predictions
from mlm_pretrain.finetune.tasks import Split, Task, load_task

STRENGTHS = (0.1, 1.0, 10.0)  # logistic regression's C, or 1 / ridge's alpha


def tfidf_baseline(task: Task | str) -> dict:
    """{"model": description, "scores": {split: metrics}} for every scored split of the task."""
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression, Ridge

    task = load_task(task) if isinstance(task, str) else task
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    vectorizer.fit(task.train.texts + (task.train.pair_texts or []))

    def features(split: Split):
        first = vectorizer.transform(split.texts)
        if split.pair_texts is None:
            return first
        second = vectorizer.transform(split.pair_texts)
        return hstack([first, second, first.multiply(second), abs(first - second)]).tocsr()

    def fit(strength: float):
        if task.is_regression:
            return Ridge(alpha=1.0 / strength)
        return LogisticRegression(C=strength, max_iter=2000)

    train_x, validation_x = features(task.train), features(task.validation)
    best_score, best_model, best_strength = -math.inf, None, None
    for strength in STRENGTHS:
        model = fit(strength).fit(train_x, task.train.labels)
        score = score_predictions(task, model.predict(validation_x).tolist(), task.validation.labels)["score"]
        if best_model is None or score > best_score:
            best_score, best_model, best_strength = score, model, strength
    name = (
        f"TF-IDF + ridge (alpha={1 / best_strength:g})"
        if task.is_regression
        else (f"TF-IDF + logistic regression (C={best_strength:g})")
    )
    return {
        "model": name,
        "scores": {
            split_name: score_predictions(task, best_model.predict(features(split)).tolist(), split.labels)
            for split_name, split in task.scored.items()
        },
    }
