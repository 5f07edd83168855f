"""Calibration, selective prediction and posterior-predictive averaging against hand-worked cases,
and `bayes-adalora evaluate` on saved tiny runs: the run's own numbers given back exactly."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import accuracy_score

from bayes_adalora.cli import main
from bayes_adalora.evaluation import (
    Predictive,
    accuracy_at_coverage,
    area_under_risk_coverage,
    brier_score,
    calibration_metrics,
    examples_at_coverage,
    expected_calibration_error,
    importance_correlations,
    mc_log_probabilities,
    mc_predictive,
    mc_regression,
    negative_log_likelihood,
    predictive_metrics,
    rank_correlation,
    selective_risks,
)
from bayes_adalora.tasks import get_task
from helpers import read_json, refused

# ----------------------------------------------------------------------------- a hand-worked binary case
#
# Six examples: (confidence of the predicted class, correct?). With 15 bins of width 1/15:
#   1.00 ok, 0.95 ok -> bin 14 (14/15 = 0.933.., 1]   acc 1,   conf 0.975 -> |diff| 0.025, weight 2/6
#   0.90 wrong       -> bin 13 (0.866.., 0.933..]     acc 0,   conf 0.90  -> 0.9,          weight 1/6
#   0.70 ok          -> bin 10 (0.666.., 0.733..]     acc 1,   conf 0.70  -> 0.3,          weight 1/6
#   0.55 ok, 0.58 wrong -> bin 8 (0.533.., 0.6]       acc 0.5, conf 0.565 -> 0.065,        weight 2/6
#   the other 10 bins are empty.
# ECE = 2/6 * 0.025 + 1/6 * 0.9 + 1/6 * 0.3 + 2/6 * 0.065 = 0.23
CONFIDENCE = [0.95, 1.0, 0.90, 0.55, 0.58, 0.70]
CORRECT = [True, True, False, True, False, True]


def binary_case():
    """Class probabilities and labels for CONFIDENCE / CORRECT: the prediction is class 0 for even rows, 1 for odd."""
    probs, labels = [], []
    for i, (c, ok) in enumerate(zip(CONFIDENCE, CORRECT)):
        predicted = i % 2
        row = [0.0, 0.0]
        row[predicted], row[1 - predicted] = c, 1.0 - c
        probs.append(row)
        labels.append(predicted if ok else 1 - predicted)
    probs = np.array(probs)
    with np.errstate(divide="ignore"):
        return Predictive(probs.argmax(axis=1), np.log(probs)), np.array(labels)


def test_ece_of_the_hand_worked_bins_with_empty_bins():
    assert expected_calibration_error(CONFIDENCE, CORRECT) == pytest.approx(0.23, abs=1e-12)


def test_ece_moves_when_a_confidence_crosses_a_bin_edge():
    # 0.58 -> 0.62 crosses 9/15 = 0.6: bin 8 keeps 0.55 ok (|1 - 0.55| = 0.45, weight 1/6),
    # bin 9 gets 0.62 wrong (0.62, weight 1/6): ECE = (0.05 + 0.9 + 0.3 + 0.45 + 0.62) / 6
    moved = [0.95, 1.0, 0.90, 0.55, 0.62, 0.70]
    assert expected_calibration_error(moved, CORRECT) == pytest.approx((0.05 + 0.9 + 0.3 + 0.45 + 0.62) / 6, abs=1e-12)


def test_ece_puts_confidence_one_in_the_last_bin_and_is_zero_when_calibrated():
    # all in one bin: 1.0 (ok) with 0.94 (ok), both in bin 14: |1 - 0.97| = 0.03
    assert expected_calibration_error([1.0, 0.94], [True, True]) == pytest.approx(0.03, abs=1e-12)
    # 10 examples at 0.7, 7 of them right: perfectly calibrated
    assert expected_calibration_error([0.7] * 10, [True] * 7 + [False] * 3) == pytest.approx(0.0, abs=1e-12)
    # one bin of width 1 (n_bins=1): |mean acc - mean conf| = |4/6 - 0.78|
    assert expected_calibration_error(CONFIDENCE, CORRECT, n_bins=1) == pytest.approx(abs(4 / 6 - 4.68 / 6), abs=1e-12)


def test_nll_and_brier_by_hand():
    predictive, labels = binary_case()
    # p(true) is c when right, 1 - c when wrong
    p_true = [0.95, 1.0, 0.10, 0.55, 0.42, 0.70]
    assert negative_log_likelihood(predictive.log_probs, labels) == pytest.approx(
        -sum(math.log(p) for p in p_true) / 6, rel=1e-12)
    # binary Brier: (p_true - 1)^2 + (1 - p_true)^2 = 2 (1 - p_true)^2
    assert brier_score(predictive.probabilities, labels) == pytest.approx(
        sum(2 * (1 - p) ** 2 for p in p_true) / 6, rel=1e-12)
    # three classes: p = (0.6, 0.3, 0.1), y = 1: 0.6^2 + 0.7^2 + 0.1^2 = 0.86
    assert brier_score([[0.6, 0.3, 0.1]], [1]) == pytest.approx(0.86, abs=1e-12)


def test_risk_coverage_by_hand():
    # by confidence: 1.0 ok, 0.95 ok, 0.90 wrong, 0.70 ok, 0.58 wrong, 0.55 ok
    risks = selective_risks(CONFIDENCE, CORRECT)
    np.testing.assert_allclose(risks, [0, 0, 1 / 3, 1 / 4, 2 / 5, 2 / 6], atol=1e-15)
    assert area_under_risk_coverage(CONFIDENCE, CORRECT) == pytest.approx(79 / 360, abs=1e-15)
    # 50%: the 3 most confident (2 right); 80%: ceil(4.8) = 5 (3 right); 100%: all 6 (4 right)
    assert accuracy_at_coverage(CONFIDENCE, CORRECT, 0.5) == pytest.approx(2 / 3)
    assert accuracy_at_coverage(CONFIDENCE, CORRECT, 0.8) == pytest.approx(3 / 5)
    assert accuracy_at_coverage(CONFIDENCE, CORRECT, 1.0) == pytest.approx(4 / 6)


def test_coverage_counts_and_ties():
    assert examples_at_coverage(5, 0.8) == 4  # 0.8 * 5 is 4.000000000000001 in floating point
    assert (
        examples_at_coverage(32, 0.5) == 16 and examples_at_coverage(3, 0.5) == 2 and examples_at_coverage(1, 0.5) == 1
    )
    # tied confidences keep the examples' order
    np.testing.assert_allclose(selective_risks([0.6, 0.6, 0.6], [False, True, True]), [1, 1 / 2, 1 / 3])


def test_calibration_metrics_gather_them_all():
    predictive, labels = binary_case()
    m = calibration_metrics(predictive, labels)
    assert set(m) == {"ece", "nll", "brier", "aurc", "accuracy_at_coverage"}
    assert m["ece"] == pytest.approx(0.23, abs=1e-12)
    assert m["aurc"] == pytest.approx(79 / 360, abs=1e-15)
    assert m["accuracy_at_coverage"] == pytest.approx({"0.5": 2 / 3, "0.8": 3 / 5, "1.0": 4 / 6})


def test_predictive_metrics_are_named_per_split():
    spec = get_task("mnli")
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    from bayes_adalora.evaluation import point_predictive

    named = predictive_metrics(spec, "dev_mismatched", point_predictive(spec, logits), np.array([0, 2]))
    assert (
        named["accuracy_mismatched"] == 0.5 and "ece_mismatched" in named and "accuracy_at_coverage_mismatched" in named
    )
    assert set(predictive_metrics(get_task("stsb"), "dev", Predictive(np.array([1.0, 2.0, 3.0])), [1.0, 3.0, 2.0])) == {
        "pearson", "spearmanr"}


# ----------------------------------------------------------------------------- Monte Carlo averaging


def test_mc_probabilities_average_the_softmax_of_each_draw():
    # draw 1: softmax (0.9, 0.1); draw 2: (0.5, 0.5); the predictive is their mean (0.7, 0.3)
    draws = np.array([[[math.log(0.9), math.log(0.1)]], [[0.0, 0.0]]])
    np.testing.assert_allclose(np.exp(mc_log_probabilities(draws)), [[0.7, 0.3]], rtol=1e-12)
    predictive = mc_predictive(get_task("sst2"), draws)
    assert predictive.predictions.tolist() == [0]
    # std over draws of the predicted class's probability: of (0.9, 0.5), dividing by K
    assert predictive.std[0] == pytest.approx(0.2, rel=1e-12)


def test_mc_log_probabilities_stay_finite_where_softmax_underflows():
    # p(class 1) = (e^-1000 + e^-1002) / 2 per draw average: log = -1000 + log((1 + e^-2) / 2)
    draws = np.array([[[0.0, -1000.0]], [[0.0, -1002.0]]])
    log_p = mc_log_probabilities(draws)
    assert log_p[0, 1] == pytest.approx(-1000.0 + math.log((1 + math.exp(-2)) / 2), rel=1e-12)
    assert negative_log_likelihood(log_p, [1]) == pytest.approx(1000.0 - math.log((1 + math.exp(-2)) / 2), rel=1e-12)


def test_mc_regression_mean_and_std():
    mean, std = mc_regression([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0]])
    np.testing.assert_allclose(mean, [3.0, 2.0])
    np.testing.assert_allclose(std, [math.sqrt(8 / 3), 0.0])  # mean square deviation (4 + 0 + 4) / 3


def test_mc_predictive_converges_to_the_expected_softmax():
    """Monte Carlo check: logit difference z ~ N(m, s^2); the average of K softmaxes tends to
    E[sigmoid(z)], integrated here by quadrature."""
    from scipy import integrate

    m, s, k = 1.5, 2.0, 200_000
    z = np.random.default_rng(0).normal(m, s, size=k)
    draws = np.stack([np.zeros_like(z), z], axis=-1)[:, None, :]  # (K, 1, 2)
    expected = integrate.quad(lambda t: stats.norm.pdf(t, m, s) / (1.0 + math.exp(-t)), -40, 40)[0]
    assert np.exp(mc_log_probabilities(draws))[0, 1] == pytest.approx(expected, abs=4 * 0.5 / math.sqrt(k))


# ----------------------------------------------------------------------------- score correlations


def test_rank_correlation_by_hand():
    # ranks (1,2,3,4) vs (1,3,2,4): sum d^2 = 2, rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert rank_correlation([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(rank_correlation([1, 2, 3], [5, 5, 5]))


def test_importance_correlations_blocks():
    posterior = {"snr": [1, 2, 3, 4], "mean_abs": [2, 4, 6, 8], "inv_sigma": [4, 3, 2, 1], "e_abs": [1, 3, 2, 4]}
    out = importance_correlations([1, 2, 3, 4], posterior)
    assert out["sensitivity"] == pytest.approx({"snr": 1.0, "mean_abs": 1.0, "inv_sigma": -1.0, "e_abs": 0.8})
    assert out["snr"] == pytest.approx({"mean_abs": 1.0, "inv_sigma": -1.0})


# ----------------------------------------------------------------------------- evaluate a saved run


def train_run(out: Path, glue_dir: Path, model: Path, *extra: str, task: str = "sst2") -> Path:
    argv = ["train", "--task", task, "--data-dir", str(glue_dir), "--model", str(model), "--output-dir", str(out),
            "--max-steps", "12", "--max-length", "32", "--no-progress", "--no-plots", *extra]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, glue_dir, tiny_deberta):
    root = tmp_path_factory.mktemp("eval-runs")
    return {
        "bayes": train_run(root / "bayes", glue_dir, tiny_deberta, "--mc-samples", "3"),
        "adalora": train_run(root / "adalora", glue_dir, tiny_deberta, "--method", "adalora"),
        "stsb": train_run(root / "stsb", glue_dir, tiny_deberta, "--method", "adalora-ivon", "--mc-samples", "2",
                          task="stsb"),
    }


def run_evaluate(capfd, *argv: str) -> dict:
    capfd.readouterr()
    code = main(["evaluate", *map(str, argv)])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


@pytest.mark.parametrize("name", ["bayes", "adalora", "stsb"])
def test_evaluate_gives_back_the_runs_final_metrics_exactly(name, runs, capfd):
    run = runs[name]
    results = read_json(run / "results.json")
    mc = ["--mc-samples", results["metrics"]["mc"]["samples"]] if "mc" in results["metrics"] else []
    out = run_evaluate(capfd, run, *mc)
    assert out["metrics"]["point"] == results["metrics"]["final"]  # the same numbers, not close ones
    if mc:
        assert out["metrics"]["mc"] == results["metrics"]["mc"]  # same seed, same draws


def test_run_holds_calibration_and_posterior_predictive(runs):
    metrics = read_json(runs["bayes"] / "results.json")["metrics"]
    final, mc = metrics["final"], metrics["mc"]
    for block in (final, mc):
        assert {"accuracy", "ece", "nll", "brier", "aurc", "accuracy_at_coverage"} <= set(block)
        assert block["accuracy_at_coverage"]["1.0"] == pytest.approx(block["accuracy"])
    assert mc["samples"] == 3
    assert mc["nll"] != final["nll"]  # the draws do move the predictions
    stsb = read_json(runs["stsb"] / "results.json")["metrics"]
    assert set(stsb["final"]) == {"pearson", "spearmanr"} and set(stsb["mc"]) == {"pearson", "spearmanr", "samples"}


def test_predictions_file_matches_the_metrics(runs, capfd, tmp_path, glue_dir):
    """Accuracy recomputed from the CSV with scikit-learn, against dev labels read here."""
    path = tmp_path / "pred.csv"
    out = run_evaluate(capfd, runs["bayes"], "--predictions", path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(glue_dir / "SST-2" / "dev.tsv", newline="") as f:
        labels = [r["label"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    assert list(rows[0]) == ["index", "prediction", "probability"]
    assert [r["index"] for r in rows] == [str(i) for i in range(len(labels))]
    point = out["metrics"]["point"]
    assert accuracy_score(labels, [r["prediction"] for r in rows]) == point["accuracy"]
    # two classes: the probability of the true label follows from the predicted one's, so NLL, Brier
    # and ECE (15 equal bins) can be worked out from the file alone
    confidence = np.array([float(r["probability"]) for r in rows])
    correct = np.array([r["prediction"] == y for r, y in zip(rows, labels)])
    p_true = np.where(correct, confidence, 1 - confidence)
    assert point["nll"] == pytest.approx(-np.log(p_true).mean(), rel=1e-6)
    assert point["brier"] == pytest.approx((2 * (1 - p_true) ** 2).mean(), rel=1e-6)
    bins = [(confidence > lo) & (confidence <= lo + 1 / 15) for lo in np.arange(15) / 15]
    ece = sum(b.mean() * abs(correct[b].mean() - confidence[b].mean()) for b in bins if b.any())
    assert point["ece"] == pytest.approx(ece, abs=1e-9)


def test_mc_predictions_carry_the_predictive_std(runs, capfd, tmp_path, glue_dir):
    path = tmp_path / "pred.csv"
    run_evaluate(capfd, runs["stsb"], "--mc-samples", "4", "--predictions", path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["index", "value", "predictive_std"]
    assert len(rows) == 32 and all(float(r["predictive_std"]) > 0 for r in rows)


def test_mc_draws_keep_pruned_triplets_pruned(runs):
    """Every weight draw leaves each lambda that is 0 in the posterior mean at exactly 0, moves the
    others, and the mean comes back bitwise."""
    from bayes_adalora.predict import posterior_draw
    from bayes_adalora.run_folder import read_run
    from bayes_adalora.run_io import load_run_model, posterior_sigma_by_name

    run = read_run(runs["bayes"])
    _, model = load_run_model(run, torch.device("cpu"))
    sigma = posterior_sigma_by_name(run, model)
    lambdas = {n: p for n, p in model.named_parameters() if ".lora_E." in n}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruned = sum(int((p == 0).sum()) for p in lambdas.values())
    assert pruned == read_json(run.folder / "config.json")["init_r"] * len(lambdas) - run.results["total_rank"]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        with posterior_draw(model, sigma, generator):
            for n, p in lambdas.items():
                zero = before[n] == 0
                assert torch.equal(p[zero], torch.zeros_like(p[zero]))
                assert (p[~zero] != before[n][~zero]).all()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_a_draw_or_a_prediction_that_fails_half_way_leaves_the_mean_weights_and_the_mode():
    """An error while a draw is being set up (out of memory, a wrong sigma) restored nothing before; one in a
    forward left the model in eval mode for a caller catching it."""
    from contextlib import nullcontext

    from torch import nn

    from bayes_adalora.predict import posterior_draw, posterior_predictive, predict

    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    mean = {n: p.detach().clone() for n, p in model.named_parameters()}
    sigma = {"0.weight": torch.ones(3, 3), "0.bias": torch.ones(3), "1.weight": torch.ones(5)}  # the last: wrong
    with pytest.raises(RuntimeError), posterior_draw(model, sigma, torch.Generator().manual_seed(0)):
        pass
    assert all(torch.equal(p, mean[n]) for n, p in model.named_parameters())

    def failing(**inputs):
        raise RuntimeError("out of memory")

    model.forward = failing
    model.train()
    with pytest.raises(RuntimeError, match="out of memory"):
        predict(model, [{"x": torch.ones(1, 3), "labels": torch.zeros(1)}], torch.device("cpu"), nullcontext())
    assert model.training
    with pytest.raises(ValueError, match="at least 1, got 0"):
        posterior_predictive(model, None, {}, samples=0)


def test_evaluate_on_a_data_file_and_a_glue_test_file(runs, capfd, tmp_path, glue_dir):
    # the dev file given as a file: the same examples, so the same metrics
    run = runs["adalora"]
    out = run_evaluate(capfd, run, "--data-file", glue_dir / "SST-2" / "dev.tsv")
    assert out["metrics"]["point"] == read_json(run / "results.json")["metrics"]["final"]
    # a user's JSONL file with label strings and a subset of rows
    with open(glue_dir / "SST-2" / "dev.tsv", newline="") as f:
        dev = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:10]
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("".join(json.dumps({"sentence": r["sentence"], "label": r["label"]}) + "\n" for r in dev))
    assert run_evaluate(capfd, run, "--data-file", jsonl)["examples"] == {"dev": 10}
    # an unlabeled GLUE test.tsv (index + sentence): the GLUE submission format
    test = tmp_path / "glue" / "SST-2" / "test.tsv"
    test.parent.mkdir(parents=True)
    test.write_text("index\tsentence\n" + "".join(f"{100 + i}\t{r['sentence']}\n" for i, r in enumerate(dev)))
    submission = tmp_path / "SST-2.tsv"
    out = run_evaluate(capfd, run, "--data-dir", tmp_path / "glue", "--split", "test", "--predictions", submission)
    assert out["metrics"]["point"] == {} and out["examples"] == {"test": 10}
    lines = submission.read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 11
    assert [line.split("\t")[0] for line in lines[1:]] == [str(100 + i) for i in range(10)]
    assert {line.split("\t")[1] for line in lines[1:]} <= {"0", "1"}


def test_evaluate_regression_predictions_agree_with_pearson(runs, capfd, tmp_path, glue_dir):
    path = tmp_path / "pred.csv"
    out = run_evaluate(capfd, runs["stsb"], "--predictions", path)
    with open(path, newline="") as f:
        values = [float(r["value"]) for r in csv.DictReader(f)]
    with open(glue_dir / "STS-B" / "dev.tsv", newline="") as f:
        labels = [float(r["score"]) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    # the file holds the values exactly; scipy here, as in the run, on the float32 predictions
    assert stats.pearsonr(np.float32(values), labels)[0] == pytest.approx(out["metrics"]["point"]["pearson"], abs=1e-6)


def test_evaluate_refuses_bad_input_with_one_sentence(runs, capfd, tmp_path, glue_dir):
    refused(capfd, ["evaluate", runs["adalora"], "--mc-samples", "4"], "--mc-samples", "adalora")
    refused(capfd, ["evaluate", tmp_path / "nothing"], "does not exist")
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    refused(capfd, ["evaluate", not_a_run], "config.json")
    # an STS-B file for an SST-2 run
    refused(capfd, ["evaluate", runs["bayes"], "--data-file", glue_dir / "STS-B" / "dev.tsv"], "sentence")
    # a run folder whose adapter or posterior is gone
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(runs["bayes"], broken)
    (broken / "posterior.safetensors").unlink()
    refused(capfd, ["evaluate", broken, "--mc-samples", "2"], "posterior.safetensors")
    shutil.rmtree(broken / "adapter")
    refused(capfd, ["evaluate", broken], "adapter")
    # unlabeled data and nowhere to write predictions
    test = tmp_path / "test.tsv"
    test.write_text("index\tsentence\n0\ta fine film\n")
    refused(capfd, ["evaluate", runs["bayes"], "--data-file", test], "--predictions")
    # a predictions path that is a folder: refused before any evaluation, nothing written
    refused(capfd, ["evaluate", runs["bayes"], "--predictions", tmp_path], "is a folder")


def test_train_refuses_mc_samples_without_a_posterior(capfd, tmp_path, glue_dir, tiny_deberta):
    out = tmp_path / "out"
    refused(capfd, ["train", "--task", "sst2", "--data-dir", glue_dir, "--model", tiny_deberta,
                           "--output-dir", out, "--method", "adalora", "--mc-samples", "4"], "--mc-samples", "adalora")
    assert not out.exists()


# ----------------------------------------------------------------------------- the correlation log of the allocators


def small_adalora(seed: int = 0):
    """A 3-matrix peft AdaLoRA net with every triplet distinct, an IVON optimizer with a random
    Hessian, and a random gradient on every adapter weight."""
    import ivon
    from peft import AdaLoraConfig, get_peft_model

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Tanh(), torch.nn.Linear(10, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, 4))
    config = AdaLoraConfig(
        init_r=5, target_r=2, tinit=2, tfinal=4, deltaT=2, total_step=20, target_modules=["0", "2", "4"]
    )
    model = get_peft_model(net, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p))
                p.grad = torch.randn_like(p)
    optimizer = ivon.IVON([p for p in model.parameters() if p.requires_grad], lr=0.1, ess=100.0, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed + 1)
    for group in optimizer.param_groups:
        group["hess"] = torch.rand(group["hess"].shape, generator=generator) * 5 + 0.01
    return model, optimizer


def expected_correlations(model, optimizer, sensitivity_of) -> dict:
    """Triplet scores matrix by matrix from the pure functions, Spearman's rho from SciPy."""
    from peft.tuners.adalora import AdaLoraLayer

    from bayes_adalora.importance import POSTERIOR_CRITERIA, posterior_score
    from bayes_adalora.posterior import posterior_sigma
    from helpers import triplet_scores

    sigmas = posterior_sigma(optimizer)
    layers = [m for m in model.modules() if isinstance(m, AdaLoraLayer)]
    factors = [(m.lora_B["default"], m.lora_E["default"], m.lora_A["default"]) for m in layers]
    posterior = {
        c: torch.cat([triplet_scores(*(posterior_score(c, p.detach(), sigmas[p]) for p in f)) for f in factors])
        for c in POSTERIOR_CRITERIA
    }
    sensitivity = torch.cat([triplet_scores(*(sensitivity_of(p) for p in f)) for f in factors])

    def rho(a, b):
        return stats.spearmanr(a.numpy(), b.numpy())[0]

    return {"sensitivity": {c: rho(sensitivity, s) for c, s in posterior.items()},
            "snr": {part: rho(posterior["snr"], posterior[part]) for part in ("mean_abs", "inv_sigma")}}


def test_posterior_allocator_logs_correlations_of_the_state_it_masks():
    from bayes_adalora.allocator import INSTANT_SENSITIVITY, CorrelationLog, install_posterior_allocator

    model, optimizer = small_adalora()
    log = CorrelationLog()
    allocator = install_posterior_allocator(model, optimizer, "snr_abs", log)
    expected = expected_correlations(model, optimizer, lambda p: (p.detach() * p.grad).abs())
    model.base_model.update_and_allocate(4)  # a masking step: 4 > tinit, 4 % deltaT == 0
    assert len(log.entries) == 1
    entry = log.entries[0]
    assert entry["step"] == 4 and entry["budget"] == allocator.budget_schedule(4)[0]
    assert entry["sensitivity"] == pytest.approx(expected["sensitivity"], abs=1e-9)
    assert entry["snr"] == pytest.approx(expected["snr"], abs=1e-9)
    assert allocator.sensitivity_kind == INSTANT_SENSITIVITY
    model.base_model.update_and_allocate(5)  # not a masking step: nothing computed
    assert len(log.entries) == 1


def test_sensitivity_allocator_logs_its_smoothed_scores_and_masks_as_peft():
    import copy

    from peft.tuners.adalora.layer import RankAllocator

    from bayes_adalora.allocator import SMOOTHED_SENSITIVITY, CorrelationLog, install_allocator

    model, optimizer = small_adalora()
    reference = copy.deepcopy(model)
    for p, q in zip(model.parameters(), reference.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    log = CorrelationLog()
    allocator = install_allocator(model, "adalora-ivon", optimizer, "snr_abs", log)
    peft_allocator = reference.base_model.rankallocator
    assert type(peft_allocator) is RankAllocator and allocator.sensitivity_kind == SMOOTHED_SENSITIVITY
    for m in (model, reference):  # EMAs of two steps' |theta * grad|
        for _ in range(2):
            m.base_model.rankallocator.update_ipt(m.base_model.model)
    names = {p: n for n, p in model.base_model.model.named_parameters()}
    expected = expected_correlations(
        model, optimizer, lambda p: allocator.exp_avg_ipt[names[p]] * allocator.exp_avg_unc[names[p]])
    pattern = allocator.mask_to_budget(model.base_model.model, 9)
    assert pattern == peft_allocator.mask_to_budget(reference.base_model.model, 9)  # masking unchanged
    entry = log.entries[0]
    assert entry["sensitivity"] == pytest.approx(expected["sensitivity"], abs=1e-9)
    assert entry["snr"] == pytest.approx(expected["snr"], abs=1e-9)


@pytest.mark.parametrize("labels", [("entailment", "not_entailment"), ("0", "1")])
def test_an_rte_file_with_names_or_class_indices_is_read_as_training_reads_it(labels, tmp_path):
    # training's --validation-file takes class indices (the hub's export); evaluate --data-file must too
    from bayes_adalora.run_io import read_eval_file
    from bayes_adalora.tasks import get_task

    path = tmp_path / "rte.tsv"
    path.write_text("sentence1\tsentence2\tlabel\n"
                    f"A man sleeps.\tA man is awake.\t{labels[1]}\nIt rains.\tIt is wet.\t{labels[0]}\n")
    split = read_eval_file(get_task("rte"), path)
    assert split.data.labels == [1, 0] and split.data.texts[1] == ("It rains.", "It is wet.")


def test_an_rte_file_with_a_label_of_neither_kind_names_the_glue_labels(tmp_path):
    from bayes_adalora.errors import UserError
    from bayes_adalora.run_io import read_eval_file
    from bayes_adalora.tasks import get_task

    path = tmp_path / "rte.tsv"
    path.write_text("sentence1\tsentence2\tlabel\nA man sleeps.\tA man is awake.\tmaybe\n")
    with pytest.raises(UserError, match=r"maybe.*entailment"):
        read_eval_file(get_task("rte"), path)


@pytest.mark.parametrize("stem", ["dev_mismatched", "dev_matched", "my_dev"])
def test_an_mnli_data_file_keeps_its_split_name(stem, tmp_path):
    # metrics are named by split (accuracy_mismatched); a mismatched file was filed as "matched"
    from bayes_adalora.run_io import SavedRun, load_eval_data

    path = tmp_path / f"{stem}.tsv"
    path.write_text("index\tsentence1\tsentence2\tgold_label\n0\tA man sleeps.\tA man is awake.\tcontradiction\n")
    run = SavedRun(tmp_path, {"task": "mnli"}, {})
    splits = load_eval_data(run, None, str(path), None, None)
    assert list(splits) == [stem if stem.startswith("dev_") else "dev_matched"]
    assert splits[next(iter(splits))].data.labels == [2]
