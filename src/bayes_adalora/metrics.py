"""GLUE's official metrics, and those of the user's own tasks (macro-F1, MSE), computed locally with
scikit-learn and SciPy (no hub downloads)."""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, mean_squared_error

from .tasks import TaskSpec


def _pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    if len(labels) < 2:
        return math.nan  # scipy raises on 1
    # in float64 whatever the inputs' dtype: SciPy computes float32 inputs in float32
    return float(stats.pearsonr(predictions.astype(np.float64), labels.astype(np.float64))[0])


def _spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    return stats.spearmanr(predictions, labels)[0] if len(labels) > 1 else math.nan


def _f1_positive(predictions: np.ndarray, labels: np.ndarray) -> float:
    # GLUE's F1 is that of class 1; no predicted positives gives 0, not a warning
    return f1_score(labels, predictions, pos_label=1, average="binary", zero_division=0.0)


def _f1_macro(predictions: np.ndarray, labels: np.ndarray) -> float:
    # the unweighted mean of per-class F1 over the classes that occur in the labels or the predictions
    return f1_score(labels, predictions, average="macro", zero_division=0.0)


_METRICS = {
    "matthews_correlation": lambda p, y: matthews_corrcoef(y, p),
    "accuracy": lambda p, y: accuracy_score(y, p),
    "f1": _f1_positive,
    "macro_f1": _f1_macro,
    "mse": lambda p, y: mean_squared_error(y.astype(np.float64), p.astype(np.float64)),  # float32 sums drift
    "pearson": _pearson,
    "spearmanr": _spearman,
}


def compute_metrics(spec: TaskSpec, predictions, labels) -> dict[str, float]:
    """The task's metrics (`spec.metrics`, in that order) of `predictions` against `labels`.

    Predictions are class indices, or floats for regression. A correlation of constant
    predictions, or of a single example, is undefined and comes back as NaN.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or predictions.ndim != 1 or len(labels) == 0:
        raise ValueError(f"need two equal, non-empty 1-D arrays, got shapes "
                         f"{predictions.shape} and {labels.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)  # NaN says it already
        return {name: float(_METRICS[name](predictions, labels)) for name in spec.metrics}


def predictions_from_logits(spec: TaskSpec, logits) -> np.ndarray:
    """Class indices (argmax over the last axis), or for regression the single output, squeezed."""
    if hasattr(logits, "detach"):  # a torch tensor: numpy cannot hold bfloat16 or grad
        logits = logits.detach().float().cpu().numpy()
    logits = np.asarray(logits)
    if spec.is_regression:
        return logits.reshape(len(logits)) if logits.ndim > 1 else logits
    return logits.argmax(axis=-1)
