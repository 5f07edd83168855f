"""Predictions of a decoder LM over its data loaders, at the weights (IVON: the posterior mean) and at
draws from IVON's posterior, and their metrics: token NLL and perplexity for causal-LM tuning, and
for multiple choice the classification metrics of the softmax over the choices' scores.

A choice's score is the sum over its tokens of log p(token | question, earlier tokens of the choice):
its log-likelihood given the question (not the mean per token, which would favour long choices less).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .evaluation import mc_predictive, point_predictive, predictive_metrics
from .lm_metrics import choice_score_matrix, completion_log_probs, mc_token_log_probs, token_nll_metrics
from .predict import posterior_draw
from .tasks import LMTaskSpec


@dataclass
class ChoiceSplit:
    """A split of multiple-choice questions as scoring reads it: a loader over every (question, choice)
    sequence, in question order, and which question each sequence belongs to."""

    loader: object
    owners: list[int]
    n_choices: list[int]
    answers: np.ndarray


@torch.no_grad()
def sequence_log_probs(model: nn.Module, loader, device: torch.device, autocast) -> list[torch.Tensor]:
    """Per sequence of the loader, the log-probabilities of its completion tokens (float32, on the CPU)."""
    was_training = model.training
    model.eval()
    out = []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with autocast:
            logits = model(**batch).logits
        out += [t.cpu() for t in completion_log_probs(logits, labels)]
    model.train(was_training)
    return out


def choice_scores(model: nn.Module, split: ChoiceSplit, device, autocast) -> np.ndarray:
    """(N, C) log-likelihood of each choice given its question (-inf where a question has fewer choices)."""
    sums = [float(t.double().sum()) for t in sequence_log_probs(model, split.loader, device, autocast)]
    return choice_score_matrix(sums, split.owners, split.n_choices)


def causal_lm_metrics(spec: LMTaskSpec, split: str, token_log_probs) -> dict:
    return {spec.metric_name(split, k): v for k, v in token_nll_metrics(token_log_probs).items()}


def evaluate_causal_lm(model: nn.Module, loaders: dict, spec: LMTaskSpec, device, autocast) -> dict:
    """Mean NLL per completion token, perplexity and the token count, on every dev split."""
    out = {}
    for split, loader in loaders.items():
        out.update(causal_lm_metrics(spec, split, torch.cat(sequence_log_probs(model, loader, device, autocast))))
    return out


def evaluate_choices(model: nn.Module, splits: dict[str, ChoiceSplit], spec: LMTaskSpec, device, autocast) -> dict:
    """Accuracy and calibration (ece, nll, brier, aurc, ...) of the softmax over the choices' scores."""
    out = {}
    for name, split in splits.items():
        scores = choice_scores(model, split, device, autocast)
        out.update(predictive_metrics(spec, name, point_predictive(spec, scores), split.answers))
    return out


def sampled(model: nn.Module, sigma: dict[str, torch.Tensor], samples: int, seed: int, predict_all):
    """[predict_all() at each of `samples` posterior draws], the draws seeded by `seed` (as
    `predict.predict_sampled` draws them)."""
    generator = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(samples):
        with posterior_draw(model, sigma, generator):
            draws.append(predict_all())
    return draws


def sampled_token_log_probs(model, loaders: dict, device, autocast, sigma, samples: int, seed: int) -> dict:
    """Per split, (K draws, sequences) of per-sequence completion-token log-probabilities."""
    def predict_all():
        return {split: sequence_log_probs(model, loader, device, autocast) for split, loader in loaders.items()}

    draws = sampled(model, sigma, samples, seed, predict_all)
    return {split: [d[split] for d in draws] for split in loaders}


def evaluate_causal_lm_sampled(model: nn.Module, loaders: dict, spec: LMTaskSpec, device, autocast,
                               sigma: dict[str, torch.Tensor], samples: int, seed: int) -> dict:
    """The posterior-predictive token NLL, -mean_t log (1/K) sum_k p_k(token_t), its perplexity, and "samples"."""
    out = {}
    for split, draws in sampled_token_log_probs(model, loaders, device, autocast, sigma, samples, seed).items():
        per_draw = np.stack([torch.cat(d).double().numpy() for d in draws])  # (K, T)
        out.update(causal_lm_metrics(spec, split, mc_token_log_probs(per_draw)))
    return {**out, "samples": samples}


def sampled_choice_scores(model, splits: dict[str, ChoiceSplit], device, autocast, sigma, samples: int,
                          seed: int) -> dict[str, np.ndarray]:
    """Per split, (K, N, C) choice scores at K posterior draws."""
    def predict_all():
        return {name: choice_scores(model, split, device, autocast) for name, split in splits.items()}

    draws = sampled(model, sigma, samples, seed, predict_all)
    return {name: np.stack([d[name] for d in draws]) for name in splits}


def evaluate_choices_sampled(model: nn.Module, splits: dict[str, ChoiceSplit], spec: LMTaskSpec, device, autocast,
                             sigma: dict[str, torch.Tensor], samples: int, seed: int) -> dict:
    """`evaluate_choices`' metrics of the posterior predictive: choice probabilities averaged over K draws."""
    out = {}
    for name, draws in sampled_choice_scores(model, splits, device, autocast, sigma, samples, seed).items():
        out.update(predictive_metrics(spec, name, mc_predictive(spec, draws), splits[name].answers))
    return {**out, "samples": samples}


# ----------------------------------------------------------------------------- one row per example


def completion_rows(model, loader, device, autocast, sigma=None, samples: int = 0, seed: int = 0):
    """(header, rows): per example its index, completion tokens and mean NLL per token; with `samples`
    draws the posterior predictive's (-mean_t log (1/K) sum_k p_k)."""
    if samples:
        draws = sampled_token_log_probs(model, {"dev": loader}, device, autocast, sigma, samples, seed)["dev"]
        per_example = [mc_token_log_probs(np.stack([d[i].double().numpy() for d in draws]))
                       for i in range(len(draws[0]))]
    else:
        per_example = [t.double().numpy() for t in sequence_log_probs(model, loader, device, autocast)]
    return ["index", "tokens", "nll"], [[i, len(t), float(-t.mean())] for i, t in enumerate(per_example)]


def choice_rows(model, split: ChoiceSplit, choices: list[list[str]], spec: LMTaskSpec, device, autocast,
                sigma=None, samples: int = 0, seed: int = 0):
    """(header, rows): per question its index, the predicted choice's index and text and its probability;
    with `samples` draws the posterior predictive's, and the std over draws of that probability."""
    if samples:
        draws = sampled_choice_scores(model, {"dev": split}, device, autocast, sigma, samples, seed)["dev"]
        predictive = mc_predictive(spec, draws)
    else:
        predictive = point_predictive(spec, choice_scores(model, split, device, autocast))
    header = ["index", "prediction", "choice", "probability"] + (["predictive_std"] if samples else [])
    rows = []
    for i, (k, p) in enumerate(zip(predictive.predictions, predictive.confidence)):
        rows.append([i, int(k), choices[i][int(k)], float(p)] + ([float(predictive.std[i])] if samples else []))
    return header, rows
