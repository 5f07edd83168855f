"""What a decoder LM's predictions are worth: the log-probability of each completion token, the mean
token NLL and perplexity, the posterior-predictive token probability over weight draws, and the
score of each choice of a multiple-choice question. Pure functions of tensors and arrays.

Token t of a sequence is predicted by the logits at position t - 1 (the shift of transformers'
causal-LM loss); a label of -100 marks a token that is not scored (prompt, padding).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import logsumexp

IGNORE_INDEX = -100  # transformers' label for a token the loss skips


def completion_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Per sequence, log p(token_t | tokens before t) of every scored token (label != -100), in order.

    logits (B, L, V), labels (B, L): log_softmax(logits[:, t - 1])[labels[:, t]], in float32. Only the
    scored positions' logits are copied to float32 (a prompt's are not: a large vocabulary's logits are big).
    """
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    rows = logits[:, :-1][scored].float()  # (scored tokens, V), sequence by sequence
    log_probs = rows.gather(-1, targets[scored].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(rows, dim=-1)
    return list(log_probs.split(scored.sum(dim=1).tolist()))


def token_nll_metrics(token_log_probs) -> dict:
    """{"nll": -(1/T) sum_t log p_t over all T scored tokens, "perplexity": exp(nll), "tokens": T}."""
    values = np.asarray(token_log_probs, dtype=np.float64)
    nll = float(-values.mean())
    with np.errstate(over="ignore"):
        perplexity = float(np.exp(nll))  # inf past exp's range; written as null
    return {"nll": nll, "perplexity": perplexity, "tokens": int(values.size)}


def mc_token_log_probs(log_prob_draws) -> np.ndarray:
    """log of the posterior-predictive token probability, log (1/K) sum_k p_k(token), from (K, T)
    log-probabilities of K weight draws; computed as logsumexp_k - log K, exact where p underflows."""
    draws = np.asarray(log_prob_draws, dtype=np.float64)
    return logsumexp(draws, axis=0) - math.log(draws.shape[0])


def choice_score_matrix(sequence_scores, owners, n_choices: list[int]) -> np.ndarray:
    """(N, C) scores of N questions' choices from one score per (question, choice) sequence, given in
    question order (`owners[s]`: the question of sequence s); C is the most choices of any question,
    and a question with fewer gets -inf for the missing ones (probability 0 after a softmax)."""
    scores = np.full((len(n_choices), max(n_choices)), -np.inf)
    seen = [0] * len(n_choices)
    for score, owner in zip(np.asarray(sequence_scores, dtype=np.float64), owners):
        scores[owner, seen[owner]] = score
        seen[owner] += 1
    return scores
