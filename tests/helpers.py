"""References the tests compare the package against, written independently of it."""

from __future__ import annotations

import math

import torch


def triplet_scores(score_p: torch.Tensor, score_lambda: torch.Tensor, score_q: torch.Tensor) -> torch.Tensor:
    """AdaLoRA's triplet score for one matrix, per triplet k: S_k = s(lambda_k) + mean_i s(P_ik) + mean_j s(Q_kj).

    score_p: (out, r) scores of P (peft's lora_B), score_lambda: (r, 1) or (r,), score_q: (r, in)
    scores of Q (peft's lora_A). Returns shape (r,).
    """
    return score_lambda.reshape(-1) + score_p.mean(dim=0) + score_q.mean(dim=1)


def rounding_bound(reference: torch.Tensor, reduction: int, depth: int) -> float:
    """How far two correct float computations of `reference` may lie apart when they differ only in the
    order of their sums (another kernel, another SIMD width: ATEN_CPU_CAPABILITY), from the dtype's
    precision and the size of the computation, not from one machine's kernels.

    A sum of n terms carries a rounding error of about eps * sqrt(n) of its terms' scale (errors of random
    sign: Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., section 2.8); `depth` such sums
    (layers, forward and backward) add theirs; the scale is the largest |value| compared; 8 is the margin
    for the constant. A wrong term (a missing adapter branch, a wrong scaling) is orders of magnitude larger.
    """
    eps = torch.finfo(reference.dtype).eps
    return 8 * eps * math.sqrt(reduction) * depth * reference.detach().abs().max().item()
