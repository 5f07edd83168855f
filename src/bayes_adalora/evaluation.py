"""Predictive quality: posterior-predictive averaging, calibration, selective prediction, and the
agreement of importance scores. Pure functions of arrays: no model, no optimizer, no files.

Probabilities are carried as log-probabilities wherever a log is taken (NLL, the MC average), so a
confident wrong prediction costs a large finite loss rather than inf. Everything is float64.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.special import log_softmax, logsumexp, softmax

from .metrics import compute_metrics, predictions_from_logits
from .tasks import TaskSpec

ECE_BINS = 15
COVERAGES = (0.5, 0.8, 1.0)


# ----------------------------------------------------------------------------- predictive distributions


@dataclass
class Predictive:
    """What a model predicts for N examples.

    `predictions`: class indices or regression values (N,). `log_probs`: class log-probabilities
    (N, C), None for regression. `std`: the spread over posterior draws (of the predicted class's
    probability, or of the regression value), None for a point prediction.
    """

    predictions: np.ndarray
    log_probs: np.ndarray | None = None
    std: np.ndarray | None = None

    @property
    def probabilities(self) -> np.ndarray:
        return np.exp(self.log_probs)

    @property
    def confidence(self) -> np.ndarray:
        """The probability of the predicted class, per example."""
        return np.exp(np.take_along_axis(self.log_probs, self.predictions.reshape(-1, 1), axis=1)[:, 0])


def point_predictive(spec: TaskSpec, logits) -> Predictive:
    """The prediction of one set of weights (IVON: the posterior mean): softmax of the logits."""
    logits = np.asarray(logits)
    predictions = predictions_from_logits(spec, logits)
    if spec.is_regression:
        return Predictive(predictions)
    return Predictive(predictions, log_softmax(logits.astype(np.float64), axis=-1))


def mc_log_probabilities(logits_draws) -> np.ndarray:
    """log p(y | x) of the posterior predictive, p = (1/K) sum_k softmax(logits_k), from (K, N, C) logits.

    Computed as logsumexp_k log_softmax(logits_k) - log K, exact where softmax underflows.
    """
    draws = np.asarray(logits_draws, dtype=np.float64)
    return logsumexp(log_softmax(draws, axis=-1), axis=0) - math.log(draws.shape[0])


def mc_regression(value_draws) -> tuple[np.ndarray, np.ndarray]:
    """(mean, standard deviation) over K draws of (K, N) predicted values; the std divides by K."""
    draws = np.asarray(value_draws, dtype=np.float64)
    return draws.mean(axis=0), draws.std(axis=0)


def mc_predictive(spec: TaskSpec, logits_draws) -> Predictive:
    """The posterior predictive from (K, N, C) logits of K weight draws (regression: C = 1).

    Classification: class probabilities averaged over draws, the argmax as prediction, and the
    std over draws of the predicted class's probability. Regression: the mean and std of the value.
    """
    draws = np.asarray(logits_draws, dtype=np.float64)
    if spec.is_regression:
        mean, std = mc_regression(draws.reshape(draws.shape[0], -1))
        return Predictive(mean, std=std)
    log_probs = mc_log_probabilities(draws)
    predictions = log_probs.argmax(axis=-1)
    per_draw = softmax(draws, axis=-1)[:, np.arange(draws.shape[1]), predictions]  # (K, N)
    return Predictive(predictions, log_probs, per_draw.std(axis=0))


# ----------------------------------------------------------------------------- calibration


def expected_calibration_error(confidence, correct, n_bins: int = ECE_BINS) -> float:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| over `n_bins` equal-width bins of confidence.

    Bin b holds confidences in (b/n_bins, (b+1)/n_bins] (the first bin also holds 0), so a
    confidence of 1.0 falls in the last bin; empty bins contribute 0.
    """
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        members = bins == b
        if members.any():
            total += members.sum() / len(confidence) * abs(correct[members].mean() - confidence[members].mean())
    return float(total)


def negative_log_likelihood(log_probs, labels) -> float:
    """NLL = -(1/N) sum_i log p_i(y_i)."""
    log_probs, labels = np.asarray(log_probs), np.asarray(labels, dtype=np.int64)
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def brier_score(probabilities, labels) -> float:
    """Brier = (1/N) sum_i sum_c (p_ic - [c = y_i])^2."""
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    onehot = np.eye(probabilities.shape[1])[labels]
    return float(((probabilities - onehot) ** 2).sum(axis=1).mean())


# ----------------------------------------------------------------------------- selective prediction


def selective_risks(confidence, correct) -> np.ndarray:
    """Risk (error rate) among the k most confident examples, for k = 1..N.

    Ties in confidence keep the examples' order (a stable sort), so the curve is reproducible.
    """
    order = np.argsort(-np.asarray(confidence, dtype=np.float64), kind="stable")
    errors = 1.0 - np.asarray(correct, dtype=np.float64)[order]
    return np.cumsum(errors) / np.arange(1, len(errors) + 1)


def area_under_risk_coverage(confidence, correct) -> float:
    """AURC = (1/N) sum_{k=1..N} risk(k/N): the mean risk over coverages k/N."""
    return float(selective_risks(confidence, correct).mean())


def examples_at_coverage(n: int, coverage: float) -> int:
    """How many examples a coverage keeps: ceil(coverage * n), at least 1."""
    return max(1, math.ceil(round(coverage * n, 9)))  # round: 0.8 * 5 is 4.000000000000001


def accuracy_at_coverage(confidence, correct, coverage: float) -> float:
    """Accuracy on the ceil(coverage * N) most confident examples (the least confident set aside)."""
    risks = selective_risks(confidence, correct)
    return float(1.0 - risks[examples_at_coverage(len(risks), coverage) - 1])


def calibration_metrics(predictive: Predictive, labels) -> dict:
    """ece, nll, brier, aurc and accuracy_at_coverage {"0.5", "0.8", "1.0"} of a classifier's predictive."""
    labels = np.asarray(labels, dtype=np.int64)
    confidence = predictive.confidence
    correct = predictive.predictions == labels
    return {
        "ece": expected_calibration_error(confidence, correct),
        "nll": negative_log_likelihood(predictive.log_probs, labels),
        "brier": brier_score(predictive.probabilities, labels),
        **selective_metrics(confidence, correct),
    }


def selective_metrics(confidence, correct) -> dict:
    """aurc and accuracy_at_coverage {"0.5", "0.8", "1.0"}."""
    return {
        "aurc": area_under_risk_coverage(confidence, correct),
        "accuracy_at_coverage": {str(c): accuracy_at_coverage(confidence, correct, c) for c in COVERAGES},
    }


def calibration_from_statistics(confidence, correct, label_log_probs, squared_probabilities) -> dict:
    """`calibration_metrics` from four numbers per example instead of its whole distribution (for a
    vocabulary-sized one): the predicted class's probability, whether it is right, log p(label) and
    sum_c p_c^2. Brier is sum_c p_c^2 - 2 p(label) + 1, the same sum expanded."""
    label_log_probs = np.asarray(label_log_probs, dtype=np.float64)
    squared = np.asarray(squared_probabilities, dtype=np.float64)
    return {
        "ece": expected_calibration_error(confidence, correct),
        "nll": float(-label_log_probs.mean()),
        "brier": float((squared - 2 * np.exp(label_log_probs) + 1).mean()),
        **selective_metrics(confidence, correct),
    }


def predictive_metrics(spec: TaskSpec, split: str, predictive: Predictive, labels) -> dict:
    """The task's official metrics of `predictive`, plus calibration for classification, named as in results.json."""
    values = compute_metrics(spec, predictive.predictions, labels)
    if not spec.is_regression:
        values.update(calibration_metrics(predictive, labels))
    return {spec.metric_name(split, name): value for name, value in values.items()}


# ----------------------------------------------------------------------------- agreement of importance scores


def rank_correlation(x, y) -> float:
    """Spearman's rho (ties get their average rank); NaN where either side is constant."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))[0])


def importance_correlations(sensitivity, posterior: dict) -> dict:
    """Spearman correlations of triplet scores computed on one state.

    `sensitivity`: AdaLoRA's score per triplet; `posterior`: criterion name -> score per triplet.
    Returns {"sensitivity": {criterion: rho}, "snr": {"mean_abs": rho, "inv_sigma": rho}}: snr =
    |mu| / sigma is the product of a magnitude and a precision, and the second block says which of
    the two its ranking follows.
    """
    return {
        "sensitivity": {name: rank_correlation(sensitivity, score) for name, score in posterior.items()},
        "snr": {part: rank_correlation(posterior["snr"], posterior[part]) for part in ("mean_abs", "inv_sigma")},
    }
