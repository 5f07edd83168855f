"""GLUE metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bayes_adalora.metrics import compute_metrics, predictions_from_logits
from bayes_adalora.tasks import get_task

# A 2x2 confusion matrix with TP=3, FN=1, FP=2, TN=4 (positive class 1).
LABELS = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
PREDS = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
# MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (12 - 2) / sqrt(5*4*6*5)
MCC = 10 / math.sqrt(600)
# F1 = 2TP / (2TP + FP + FN) = 6 / 9; accuracy = (TP + TN) / n = 7 / 10
F1, ACCURACY = 6 / 9, 0.7


def test_cola_matthews_correlation_by_hand():
    result = compute_metrics(get_task("cola"), PREDS, LABELS)
    assert result == {"matthews_correlation": pytest.approx(MCC)}
    assert type(result["matthews_correlation"]) is float


def test_mrpc_f1_of_class_one_and_accuracy():
    result = compute_metrics(get_task("mrpc"), np.array(PREDS), np.array(LABELS))
    assert list(result) == ["f1", "accuracy"]
    assert result["f1"] == pytest.approx(F1)
    assert result["accuracy"] == pytest.approx(ACCURACY)
    assert all(type(v) is float for v in result.values())


def test_f1_is_of_class_one_not_class_zero():
    # swapping the classes: F1 of the new class 1 (old class 0: TP=4, FP=1, FN=2) is 8/11
    flipped = compute_metrics(get_task("qqp"), [1 - p for p in PREDS], [1 - y for y in LABELS])
    assert flipped["f1"] == pytest.approx(8 / 11)


def test_no_predicted_positives_gives_f1_zero_and_mcc_zero():
    labels = [1, 0, 1, 0]
    assert compute_metrics(get_task("mrpc"), [0, 0, 0, 0], labels)["f1"] == 0.0
    # MCC's denominator is zero for constant predictions; the convention is 0
    assert compute_metrics(get_task("cola"), [0, 0, 0, 0], labels)["matthews_correlation"] == 0.0


def test_multiclass_accuracy():
    result = compute_metrics(get_task("mnli"), [0, 1, 2, 2], [0, 1, 1, 2])
    assert result == {"accuracy": 0.75}


def test_stsb_pearson_and_spearman_by_hand():
    # x mean 2.5, y mean 4: sum dx*dy = 14, sum dx^2 = 5, sum dy^2 = 50, so r = 14 / sqrt(250);
    # y rises with x, so the rank correlation is exactly 1
    result = compute_metrics(get_task("stsb"), [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 10.0])
    assert list(result) == ["pearson", "spearmanr"]
    assert result["pearson"] == pytest.approx(14 / math.sqrt(250))
    assert result["spearmanr"] == pytest.approx(1.0)


def test_spearman_uses_average_ranks_for_ties():
    # ranks of x = [1, 2.5, 2.5, 4], of y = [1, 2, 3, 4]: r = 4.5 / sqrt(4.5 * 5)
    result = compute_metrics(get_task("stsb"), [1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0])
    assert result["spearmanr"] == pytest.approx(4.5 / math.sqrt(22.5))


def test_constant_regression_predictions_give_nan():
    result = compute_metrics(get_task("stsb"), [2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert math.isnan(result["pearson"]) and math.isnan(result["spearmanr"])


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError):
        compute_metrics(get_task("sst2"), [0, 1], [0, 1, 1])


def test_predictions_from_logits_classification():
    logits = torch.tensor([[0.1, 2.0], [3.0, -1.0], [0.0, 0.5]], requires_grad=True)
    assert predictions_from_logits(get_task("sst2"), logits).tolist() == [1, 0, 1]
    three = np.array([[0.0, 0.1, 0.2], [5.0, 0.0, 0.0]])
    assert predictions_from_logits(get_task("mnli"), three).tolist() == [2, 0]


def test_predictions_from_logits_regression_squeezes():
    logits = torch.tensor([[1.5], [4.25]], dtype=torch.bfloat16)
    predictions = predictions_from_logits(get_task("stsb"), logits)
    assert predictions.shape == (2,)
    assert predictions.tolist() == [1.5, 4.25]


def test_one_regression_example_gives_nan_not_an_error():
    # a 1-row STS-B dev file (or --max-eval-samples 1): scipy refuses correlations of fewer than 2
    result = compute_metrics(get_task("stsb"), [2.5], [3.0])
    assert math.isnan(result["pearson"]) and math.isnan(result["spearmanr"])
