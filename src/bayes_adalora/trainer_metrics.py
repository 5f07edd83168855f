"""Metric functions for a `transformers.Trainer`'s evaluation: accuracy with the calibration metrics of
results.json (ece, nll, brier, aurc, accuracy at coverage), for classifiers and, without gathering the
vocabulary's logits, for causal LMs (`reduce_lm_logits` with `compute_lm_metrics`)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import log_softmax
from transformers import EvalPrediction

from .evaluation import Predictive, calibration_from_statistics, calibration_metrics
from .lm_metrics import IGNORE_INDEX


def compute_metrics(eval_prediction) -> dict[str, float]:
    """A Trainer's `compute_metrics` for any classifier: accuracy, ece, nll, brier, aurc and
    accuracy_at_coverage_{0.5,0.8,1.0} (`evaluation.calibration_metrics`, as in results.json).

    Logits (N, C) with labels (N,) (sequence classification, multiple choice), or (N, T, V) with
    labels (N, T) for a causal LM: the logits at position t predict the label at t + 1, and labels
    -100 (padding, the prompt) are left out, as in the model's own loss. A causal LM's (N, T, V)
    logits are reduced a few rows at a time; to keep the Trainer from gathering them at all, use
    `reduce_lm_logits` with `compute_lm_metrics` instead.
    """
    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    labels = np.asarray(labels)
    if np.ndim(logits) == 3:
        rows = max(1, LM_CHUNK_ENTRIES // max(1, logits.shape[1] * logits.shape[2]))
        statistics = [reduce_lm_logits(torch.as_tensor(np.asarray(logits[i:i + rows])),
                                       torch.as_tensor(labels[i:i + rows])).numpy()
                      for i in range(0, len(logits), rows)]
        return compute_lm_metrics(EvalPrediction(np.concatenate(statistics), labels))
    logits = np.asarray(logits, dtype=np.float64)
    scored = labels != IGNORE_INDEX
    check_scored(scored)
    logits, labels = logits[scored], labels[scored].astype(np.int64)
    predictive = Predictive(logits.argmax(axis=-1), log_softmax(logits, axis=-1))
    return flat_metrics(float((predictive.predictions == labels).mean()), calibration_metrics(predictive, labels))


LM_CHUNK_ENTRIES = 2**24  # logits reduced at a time by compute_metrics (64 MiB of float32)
LM_STATISTICS = ("predicted", "log_confidence", "label_log_prob", "squared_probability")


def reduce_lm_logits(logits, labels) -> torch.Tensor:
    """A Trainer's `preprocess_logits_for_metrics` for a causal LM: (N, T, V) logits to (N, T - 1, 4)
    next-token statistics (`LM_STATISTICS`: the predicted token, log of its probability, log p of the
    label, sum of squared probabilities), on the model's device, so that the Trainer gathers 4 numbers
    a token instead of V. Position t describes the prediction of label t + 1. Use with `compute_lm_metrics`.
    """
    logits = logits[0] if isinstance(logits, tuple) else logits
    if labels is None:
        raise ValueError("reduce_lm_logits needs the evaluation batches' labels (a `labels` column)")
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:].to(log_probs.device)
    log_confidence, predicted = log_probs.max(dim=-1)
    label_log_prob = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    squared = torch.exp(2 * log_probs).sum(dim=-1)
    return torch.stack([predicted.float(), log_confidence, label_log_prob, squared], dim=-1)


def compute_lm_metrics(eval_prediction) -> dict[str, float]:
    """`compute_metrics` for a causal LM evaluated with `preprocess_logits_for_metrics=reduce_lm_logits`:
    the same numbers as `compute_metrics` on its full logits, over the tokens whose label is not -100."""
    statistics, labels = np.asarray(eval_prediction.predictions), np.asarray(eval_prediction.label_ids)
    if statistics.ndim != 3 or statistics.shape[-1] != len(LM_STATISTICS):
        raise ValueError(f"compute_lm_metrics expects reduce_lm_logits' (N, T - 1, {len(LM_STATISTICS)}) statistics "
                         f"(pass preprocess_logits_for_metrics=reduce_lm_logits), got shape {statistics.shape}")
    targets = labels[:, 1:]
    width = min(statistics.shape[1], targets.shape[1])  # the Trainer pads both to its longest batch
    statistics, targets = statistics[:, :width], targets[:, :width]
    scored = targets != IGNORE_INDEX
    check_scored(scored)
    predicted, log_confidence, label_log_prob, squared = np.moveaxis(statistics[scored].astype(np.float64), -1, 0)
    correct = predicted.astype(np.int64) == targets[scored]
    metrics = calibration_from_statistics(np.exp(log_confidence), correct, label_log_prob, squared)
    return flat_metrics(float(correct.mean()), metrics)


def check_scored(scored: np.ndarray) -> None:
    if not scored.any():
        raise ValueError("the evaluation set has no scored label (every label is -100): nothing to compute "
                         "metrics on")


def flat_metrics(accuracy: float, metrics: dict) -> dict[str, float]:
    """accuracy and the calibration metrics as one flat dict: the Trainer's loggers take numbers only."""
    at_coverage = metrics.pop("accuracy_at_coverage")
    return {"accuracy": accuracy, **metrics, **{f"accuracy_at_coverage_{c}": v for c, v in at_coverage.items()}}
