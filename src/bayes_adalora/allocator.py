"""The one place that overrides a peft internal: AdaLoRA's RankAllocator scoring and masking.

peft's `RankAllocator` keeps the budget schedule and `update_and_allocate`; we replace the
elementwise score `s` (read from IVON's posterior at allocation steps, instead of sensitivity EMAs
updated at every step) and the masking, which keeps exactly the budget where scores tie. The
triplet score is peft's: S_k = s(lambda_k) + mean_i s(P_ik) + mean_j s(Q_kj).

Pruned triplets and IVON's noise: a masked lambda_k is set to exactly 0 in the posterior mean
(what evaluation and the saved adapter use), but as in the paper its posterior sigma is kept, so
sampled training passes still perturb it and the gradient may regrow it until the next mask.
After `total_step - tfinal`, peft re-applies the final pattern after every step.

Correlation log (`log_correlations`): at each masking, before the mask, the triplet scores of
AdaLoRA's sensitivity and of every posterior criterion are computed on that one state and their
Spearman correlations appended to `correlation_log`. Nothing is computed between maskings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners.adalora.layer import AdaLoraLayer, RankAllocator

from .evaluation import importance_correlations
from .importance import POSTERIOR_CRITERIA, posterior_score
from .posterior import posterior_sigma_from_hessian

# What "sensitivity" means in the correlation log of each allocator.
INSTANT_SENSITIVITY = "instantaneous |mu * grad|: posterior mean times the gradient of the last sampled training pass"
SMOOTHED_SENSITIVITY = "AdaLoRA's smoothed exp_avg_ipt * exp_avg_unc of |theta * grad|"


@dataclass
class _FlatLayout:
    key: tuple  # identities of the lambda parameters the layout was built for
    params: list  # P, lambda, Q of each layer in turn
    index: torch.Tensor  # position of each entry in IVON's concatenated flat state
    segment: torch.Tensor  # global triplet index of each entry
    weight: torch.Tensor  # 1 for lambda, 1/out for P, 1/in for Q (means as sums)
    names: list  # (module name, peft's lora_E parameter name, rank) per layer
    n_triplets: int


class _PosteriorTriplets:
    """Triplet scores from IVON's flat state in one pass, and the correlation log; mixed into peft's RankAllocator."""

    optimizer = None
    criterion: str | None = None
    correlation_log: list | None = None  # a list to append to, or None: no logging
    sensitivity_kind = INSTANT_SENSITIVITY
    _layout: _FlatLayout | None = None
    _step: int | None = None

    def update_and_allocate(self, model, global_step, force_mask=False):
        self._step = global_step  # for the correlation log; peft does not pass the step to mask_to_budget
        return super().update_and_allocate(model, global_step, force_mask)

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
                if p is not None:  # IVON's flat state skips them too
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

    def _posterior_state(self, layout: _FlatLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) of every P, lambda, Q entry, flat in layout order."""
        sigma = torch.cat([
            posterior_sigma_from_hessian(g["hess"], g["ess"], g["weight_decay"]) for g in self.optimizer.param_groups
        ])[layout.index]
        return torch.cat([p.detach().reshape(-1) for p in layout.params]), sigma

    def _triplet_sum(self, layout: _FlatLayout, score: torch.Tensor) -> torch.Tensor:
        """S_k = s(lambda_k) + mean_i s(P_ik) + mean_j s(Q_kj), as one weighted segment sum."""
        return torch.zeros(layout.n_triplets, dtype=score.dtype, device=score.device).index_add_(
            0, layout.segment, score * layout.weight
        )

    def triplet_scores(self, model, criterion: str | None = None) -> torch.Tensor:
        """S_k under `criterion` (default: the allocator's) of every triplet, concatenated in `svd_layers` order."""
        layout = self._flat_layout(model)
        mu, sigma = self._posterior_state(layout)
        return self._triplet_sum(layout, posterior_score(criterion or self.criterion, mu, sigma))

    def sensitivity_scores(self, model) -> torch.Tensor:
        """Elementwise sensitivity, flat in layout order (here: |mu * grad|, 0 where no gradient is held)."""
        layout = self._flat_layout(model)
        return torch.cat([
            (p.detach() * p.grad).abs().reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device)
            for p in layout.params
        ])

    @torch.no_grad()
    def log_correlations(self, model, budget: int) -> None:
        """Append Spearman correlations of the triplet scores of sensitivity and of each posterior criterion."""
        layout = self._flat_layout(model)
        mu, sigma = self._posterior_state(layout)
        posterior = {c: self._triplet_sum(layout, posterior_score(c, mu, sigma)).cpu().numpy() for c in POSTERIOR_CRITERIA}
        sensitivity = self._triplet_sum(layout, self.sensitivity_scores(model).float()).cpu().numpy()
        self.correlation_log.append(
            {"step": self._step, "budget": int(budget), **importance_correlations(sensitivity, posterior)}
        )


class PosteriorRankAllocator(_PosteriorTriplets, RankAllocator):
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
        self._layout = None

    def update_ipt(self, model) -> None:
        """Nothing to accumulate: the posterior is IVON's own state, read only when masking."""

    @torch.no_grad()
    def mask_to_budget(self, model, budget):
        """Mask the `init_bgt - budget` lowest-scoring triplets; returns peft's rank pattern."""
        if self.correlation_log is not None:
            self.log_correlations(model, budget)
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


class SensitivityRankAllocator(_PosteriorTriplets, RankAllocator):
    """peft's own RankAllocator (adalora-ivon: sensitivity from IVON's gradients), unchanged, that
    logs at each masking how its smoothed sensitivity ranks triplets against the posterior criteria."""

    sensitivity_kind = SMOOTHED_SENSITIVITY

    def __init__(self, model, peft_config, adapter_name: str, optimizer):
        super().__init__(model, peft_config, adapter_name)
        self.optimizer = optimizer
        self._layout = None

    def sensitivity_scores(self, model) -> torch.Tensor:
        """AdaLoRA's score exp_avg_ipt * exp_avg_unc, flat in layout order."""
        layout = self._flat_layout(model)
        keys = [f"{module}.{factor}.{self.adapter_name}"
                for module, _, _ in layout.names for factor in ("lora_B", "lora_E", "lora_A")]  # P, lambda, Q
        return torch.cat([(self.exp_avg_ipt[k] * self.exp_avg_unc[k]).reshape(-1) for k in keys])

    @torch.no_grad()
    def mask_to_budget(self, model, budget):
        if self.correlation_log is not None:
            self.log_correlations(model, budget)
        return super().mask_to_budget(model, budget)


def install_posterior_allocator(peft_model, optimizer, criterion: str,
                                log_correlations: bool = False) -> PosteriorRankAllocator:
    """Replace the RankAllocator of a peft AdaLoRA model by a posterior one reading `optimizer` (IVON)."""
    tuner = peft_model.base_model
    adapter = tuner.trainable_adapter_name
    allocator = PosteriorRankAllocator(tuner.model, tuner.peft_config[adapter], adapter, optimizer, criterion)
    allocator.correlation_log = [] if log_correlations else None
    tuner.rankallocator = allocator
    return allocator


def install_correlation_logger(peft_model, optimizer) -> SensitivityRankAllocator:
    """Replace peft's RankAllocator by the same allocator that also logs score correlations (adalora-ivon)."""
    tuner = peft_model.base_model
    adapter = tuner.trainable_adapter_name
    allocator = SensitivityRankAllocator(tuner.model, tuner.peft_config[adapter], adapter, optimizer)
    allocator.correlation_log = []
    tuner.rankallocator = allocator
    return allocator
