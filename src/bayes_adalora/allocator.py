"""The one place that overrides a peft internal: AdaLoRA's RankAllocator scoring.

peft's `RankAllocator` keeps the budget schedule, the triplet score
(S_k = s(lambda_k) + mean_i s(P_ik) + mean_j s(Q_kj)), the threshold and the masking; we keep
all of that and replace only the elementwise score `s`: read from IVON's posterior at allocation
steps, instead of sensitivity EMAs updated at every step.

Pruned triplets and IVON's noise: a masked lambda_k is set to exactly 0 in the posterior mean
(what evaluation and the saved adapter use), but as in the paper its posterior sigma is kept, so
sampled training passes still perturb it and the gradient may regrow it until the next mask.
After `total_step - tfinal`, peft re-applies the final pattern after every step.
"""

from __future__ import annotations

import torch
from peft.tuners.adalora.layer import RankAllocator

from .importance import POSTERIOR_CRITERIA, posterior_score
from .posterior import posterior_sigma


class PosteriorRankAllocator(RankAllocator):
    """peft's RankAllocator with `s` = a posterior criterion of IVON's state (`importance.posterior_score`)."""

    def __init__(self, model, peft_config, adapter_name: str, optimizer, criterion: str):
        if criterion not in POSTERIOR_CRITERIA:
            raise ValueError(f"unknown posterior criterion {criterion!r}: choose one of {', '.join(POSTERIOR_CRITERIA)}")
        super().__init__(model, peft_config, adapter_name)
        self.optimizer = optimizer
        self.criterion = criterion
        self._scores: dict[str, torch.Tensor] = {}

    def update_ipt(self, model) -> None:
        """Nothing to accumulate: the posterior is IVON's own state, read only when masking."""

    @torch.no_grad()
    def mask_to_budget(self, model, budget):
        """Score every adapter weight from the current posterior, then let peft rank and mask."""
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        adapter_params = {n: p for n, p in named.items() if self._is_svd_factor(n)}
        sigmas = posterior_sigma(self.optimizer, set(adapter_params.values()))
        missing = [n for n, p in adapter_params.items() if p not in sigmas]
        if missing:
            raise RuntimeError(f"the IVON optimizer does not hold the adapter parameter {missing[0]}")
        self._scores = {n: posterior_score(self.criterion, p, sigmas[p]) for n, p in adapter_params.items()}
        try:
            return super().mask_to_budget(model, budget)
        finally:
            self._scores = {}

    def _is_svd_factor(self, name: str) -> bool:
        # peft names the factors lora_A (Q), lora_E (lambda), lora_B (P); this is peft's own test
        return any(f"{factor}.{self.adapter_name}" in name for factor in ("lora_A", "lora_E", "lora_B"))

    def _element_score(self, n):
        return self._scores[n]


def install_posterior_allocator(peft_model, optimizer, criterion: str) -> PosteriorRankAllocator:
    """Replace the RankAllocator of a peft AdaLoRA model by a posterior one reading `optimizer` (IVON)."""
    tuner = peft_model.base_model
    adapter = tuner.trainable_adapter_name
    allocator = PosteriorRankAllocator(tuner.model, tuner.peft_config[adapter], adapter, optimizer, criterion)
    tuner.rankallocator = allocator
    return allocator
