"""The one place that overrides a peft internal: AdaLoRA's RankAllocator scoring and masking.

peft's `RankAllocator` keeps the budget schedule and `update_and_allocate`; we replace the
elementwise score `s` (read from IVON's posterior at allocation steps, instead of sensitivity EMAs
updated at every step) and the masking, which keeps exactly the budget where scores tie. The
triplet score is peft's: S_k = s(lambda_k) + mean_i s(P_ik) + mean_j s(Q_kj).

Pruned triplets and IVON's noise: a masked lambda_k is set to exactly 0 in the posterior mean
(what evaluation and the saved adapter use), but as in the paper its posterior sigma is kept, so
sampled training passes still perturb it and the gradient may regrow it until the next mask.
After `total_step - tfinal`, peft re-applies the final pattern after every step.
"""

from __future__ import annotations

import torch
from peft.tuners.adalora.layer import AdaLoraLayer, RankAllocator

from .importance import POSTERIOR_CRITERIA, posterior_score, triplet_scores
from .posterior import posterior_sigma


class PosteriorRankAllocator(RankAllocator):
    """peft's RankAllocator with `s` = a posterior criterion of IVON's state (`importance.posterior_score`).

    Budget schedule, `update_and_allocate` and the final pattern are peft's. Masking keeps exactly
    the budget: peft masks every triplet scoring at or below the k-th lowest score, so tied scores
    (common for `inv_sigma` early on, when IVON's Hessian is still near its initial value
    everywhere) would prune more than asked; here the k lowest are masked, ties broken by order.
    Without ties this is peft's masking exactly (tested against it).
    """

    def __init__(self, model, peft_config, adapter_name: str, optimizer, criterion: str):
        if criterion not in POSTERIOR_CRITERIA:
            raise ValueError(f"unknown posterior criterion {criterion!r}: choose one of {', '.join(POSTERIOR_CRITERIA)}")
        super().__init__(model, peft_config, adapter_name)
        self.optimizer = optimizer
        self.criterion = criterion

    def update_ipt(self, model) -> None:
        """Nothing to accumulate: the posterior is IVON's own state, read only when masking."""

    def svd_layers(self, model) -> list[tuple[str, AdaLoraLayer]]:
        """(module name, layer) of every AdaLoRA layer training this adapter, in the model's order."""
        return [(n, m) for n, m in model.named_modules() if isinstance(m, AdaLoraLayer) and self.adapter_name in m.lora_E]

    def triplet_scores(self, model) -> list[tuple[str, torch.Tensor]]:
        """(peft's lora_E parameter name, S_k for each triplet) of every adapted matrix."""
        layers = self.svd_layers(model)
        factors = [(m.lora_B[self.adapter_name], m.lora_E[self.adapter_name], m.lora_A[self.adapter_name])
                   for _, m in layers]
        sigmas = posterior_sigma(self.optimizer, {p for trio in factors for p in trio})
        out = []
        for (name, _), trio in zip(layers, factors):
            if any(p not in sigmas for p in trio):
                raise RuntimeError(f"the IVON optimizer does not hold the adapter parameters of {name}")
            p_score, e_score, q_score = (posterior_score(self.criterion, p, sigmas[p]) for p in trio)
            out.append((f"{name}.lora_E.{self.adapter_name}", triplet_scores(p_score, e_score, q_score)))
        return out

    @torch.no_grad()
    def mask_to_budget(self, model, budget):
        """Mask the `init_bgt - budget` lowest-scoring triplets; returns peft's rank pattern."""
        scored = self.triplet_scores(model)
        everything = torch.cat([s for _, s in scored])
        keep = torch.ones_like(everything, dtype=torch.bool)
        n_masked = self.init_bgt - budget
        if n_masked > 0:
            keep[torch.sort(everything, stable=True).indices[:n_masked]] = False
        rank_pattern = {}
        layers = dict(self.svd_layers(model))
        offset = 0
        for name, scores in scored:
            kept = keep[offset : offset + scores.numel()]
            offset += scores.numel()
            module = layers[name.rsplit(".lora_E.", 1)[0]]
            module.lora_E[self.adapter_name].masked_fill_(~kept.view(-1, 1), 0.0)
            rank_pattern[name] = kept.tolist()
        return rank_pattern


def install_posterior_allocator(peft_model, optimizer, criterion: str) -> PosteriorRankAllocator:
    """Replace the RankAllocator of a peft AdaLoRA model by a posterior one reading `optimizer` (IVON)."""
    tuner = peft_model.base_model
    adapter = tuner.trainable_adapter_name
    allocator = PosteriorRankAllocator(tuner.model, tuner.peft_config[adapter], adapter, optimizer, criterion)
    tuner.rankallocator = allocator
    return allocator
