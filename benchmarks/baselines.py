"""Trivial baselines of a GLUE dev set: what a model that ignores its input scores."""

from __future__ import annotations

import math
from collections import Counter
from functools import cache

from bayes_adalora.data import load_task_data
from bayes_adalora.metrics import compute_metrics
from bayes_adalora.tasks import get_task


@cache
def trivial_baseline(task: str, glue_dir: str, metric: str) -> float:
    """The main metric of always predicting the dev set's majority class (classification), or of a
    constant prediction (regression: its correlation is undefined and counts as 0)."""
    spec = get_task(task)
    labels = load_task_data(spec, data_dir=glue_dir).dev[spec.dev_splits[0]].labels
    if spec.is_regression:
        return 0.0
    majority = Counter(labels).most_common(1)[0][0]
    value = compute_metrics(spec, [majority] * len(labels), labels)[metric]
    return 0.0 if math.isnan(value) else value


@cache
def constant_train_loss(task: str, glue_dir: str) -> float:
    """The training loss of the best input-blind prediction on the training file: the entropy of its label
    frequencies (cross-entropy, classification) or its labels' variance (squared error, regression)."""
    spec = get_task(task)
    labels = load_task_data(spec, data_dir=glue_dir).train.labels
    if spec.is_regression:
        mean = sum(labels) / len(labels)
        return sum((y - mean) ** 2 for y in labels) / len(labels)
    return -sum(n / len(labels) * math.log(n / len(labels)) for n in Counter(labels).values())
