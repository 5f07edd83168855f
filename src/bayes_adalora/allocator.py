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

from dataclasses import dataclass

import torch
from peft.tuners.adalora.layer import AdaLoraLayer, RankAllocator

from .importance import POSTERIOR_CRITERIA, posterior_score
from .posterior import posterior_sigma_from_hessian


@dataclass
class _FlatLayout:
    key: tuple  # identities of the lambda parameters the layout was built for
    params: list  # P, lambda, Q of each layer in turn
    index: torch.Tensor  # position of each entry in IVON's concatenated flat state
    segment: torch.Tensor  # global triplet index of each entry
    weight: torch.Tensor  # 1 for lambda, 1/out for P, 1/in for Q (means as sums)
    names: list  # (module name, peft's lora_E parameter name, rank) per layer
    n_triplets: int


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
        self._layout: _FlatLayout | None = None

    def update_ipt(self, model) -> None:
        """Nothing to accumulate: the posterior is IVON's own state, read only when masking."""

    def svd_layers(self, model) -> list[tuple[str, AdaLoraLayer]]:
        """(module name, layer) of every AdaLoRA layer training this adapter, in the model's order."""
        return [(n, m) for n, m in model.named_modules() if isinstance(m, AdaLoraLayer) and self.adapter_name in m.lora_E]

    def _flat_layout(self, model) -> _FlatLayout:
        """Where every P, lambda, Q entry sits in IVON's flat state and which triplet it scores,
        built once: masking then costs a fixed handful of tensor ops, whatever the layer count."""
        layers = self.svd_layers(model)
        key = tuple(id(m.lora_E[self.adapter_name]) for _, m in layers)
        if self._layout is not None and self._layout.key == key:
            return self._layout
        offsets, offset = {}, 0
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                offsets[p] = offset
                offset += p.numel()
        params, index, segment, weight, names, first = [], [], [], [], [], 0
        for name, m in layers:
            P, E, Q = m.lora_B[self.adapter_name], m.lora_E[self.adapter_name], m.lora_A[self.adapter_name]
            r = E.shape[0]
            if any(p not in offsets for p in (P, E, Q)):
                raise RuntimeError(f"the IVON optimizer does not hold the adapter parameters of {name}")
            # P is (out, r) row-major, Q is (r, in): entry -> its triplet k, weighted for a mean
            for p, k, w in ((P, torch.arange(r).repeat(P.shape[0]), 1.0 / P.shape[0]),
                            (E, torch.arange(r), 1.0),
                            (Q, torch.arange(r).repeat_interleave(Q.shape[1]), 1.0 / Q.shape[1])):
                params.append(p)
                index.append(torch.arange(offsets[p], offsets[p] + p.numel()))
                segment.append(first + k)
                weight.append(torch.full((p.numel(),), w))
            names.append((name, f"{name}.lora_E.{self.adapter_name}", r))
            first += r
        device = params[0].device
        self._layout = _FlatLayout(
            key, params, torch.cat(index).to(device), torch.cat(segment).to(device),
            torch.cat(weight).to(device), names, first,
        )
        return self._layout

    def triplet_scores(self, model) -> torch.Tensor:
        """S_k of every triplet of every adapted matrix, concatenated in `svd_layers` order."""
        layout = self._flat_layout(model)
        sigma = torch.cat([
            posterior_sigma_from_hessian(g["hess"], g["ess"], g["weight_decay"]) for g in self.optimizer.param_groups
        ])[layout.index]
        mu = torch.cat([p.detach().reshape(-1) for p in layout.params])
        score = posterior_score(self.criterion, mu, sigma)
        # S_k = s(lambda_k) + mean_i s(P_ik) + mean_j s(Q_kj), as one weighted segment sum
        return torch.zeros(layout.n_triplets, dtype=score.dtype, device=score.device).index_add_(
            0, layout.segment, score * layout.weight
        )

    @torch.no_grad()
    def mask_to_budget(self, model, budget):
        """Mask the `init_bgt - budget` lowest-scoring triplets; returns peft's rank pattern."""
        scores = self.triplet_scores(model)
        layout = self._layout
        keep = torch.ones_like(scores, dtype=torch.bool)
        n_masked = self.init_bgt - budget
        if n_masked > 0:
            keep[torch.sort(scores, stable=True).indices[:n_masked]] = False
        sizes = [r for _, _, r in layout.names]
        lambdas = [layout.params[3 * i + 1] for i in range(len(sizes))]
        torch._foreach_mul_(lambdas, [k.view(-1, 1).to(lam.dtype) for k, lam in zip(keep.split(sizes), lambdas)])
        flags, rank_pattern, offset = keep.tolist(), {}, 0
        for _, param_name, r in layout.names:
            rank_pattern[param_name] = flags[offset : offset + r]
            offset += r
        return rank_pattern


def install_posterior_allocator(peft_model, optimizer, criterion: str) -> PosteriorRankAllocator:
    """Replace the RankAllocator of a peft AdaLoRA model by a posterior one reading `optimizer` (IVON)."""
    tuner = peft_model.base_model
    adapter = tuner.trainable_adapter_name
    allocator = PosteriorRankAllocator(tuner.model, tuner.peft_config[adapter], adapter, optimizer, criterion)
    tuner.rankallocator = allocator
    return allocator
