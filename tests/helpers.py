"""References the tests compare the package against, written independently of it."""

from __future__ import annotations

import torch


def triplet_scores(score_p: torch.Tensor, score_lambda: torch.Tensor, score_q: torch.Tensor) -> torch.Tensor:
    """AdaLoRA's triplet score for one matrix, per triplet k: S_k = s(lambda_k) + mean_i s(P_ik) + mean_j s(Q_kj).

    score_p: (out, r) scores of P (peft's lora_B), score_lambda: (r, 1) or (r,), score_q: (r, in)
    scores of Q (peft's lora_A). Returns shape (r,).
    """
    return score_lambda.reshape(-1) + score_p.mean(dim=0) + score_q.mean(dim=1)
