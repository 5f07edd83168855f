"""The one place that overrides a peft internal: AdaLoRA's RankAllocator scoring and masking.

peft's `RankAllocator` keeps the budget schedule and `update_and_allocate`; we replace the
elementwise score `s` (read from IVON's posterior at allocation steps, instead of sensitivity EMAs
updated at every step) and the masking, which keeps exactly the budget where scores tie. The
triplet score is peft's: S_k = s(lambda_k) + mean_i s(P_ik) + mean_j s(Q_kj).

In pure parts: `triplet_layout` (where each P, lambda, Q entry sits in IVON's flat state),
`triplet_sum` (scores to triplet scores), `triplets_to_keep` (the stable choice of the budget) and
`apply_mask` / `rank_pattern`; the peft subclasses below are the glue.

Pruned triplets and IVON's noise: a masked lambda_k is set to exactly 0 in the posterior mean
(what evaluation and the saved adapter use), but as in the paper its posterior sigma is kept, so
sampled training passes still perturb it and the gradient may regrow it until the next mask.
After `total_step - tfinal`, peft re-applies the final pattern after every step.

Correlation log: at each masking, before the mask, the triplet scores of AdaLoRA's sensitivity and
of every posterior criterion are computed on that one state and their Spearman correlations
appended to the `CorrelationLog` given at construction. Nothing is computed between maskings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft.tuners.adalora.layer import RankAllocator
from torch import Tensor

from .adapters import FACTORS, SVDLayer, sensitivity_parameters, svd_layers
from .evaluation import importance_correlations
from .importance import POSTERIOR_CRITERIA, posterior_score
from .methods import get_method
from .posterior import posterior_sigma_from_hessian
from .sharding import all_sum, gather_rows, is_sharded, local_shard, model_is_sharded, shard_rows

# What "sensitivity" means in the correlation log of each allocator.
INSTANT_SENSITIVITY = "instantaneous |mu * grad|: posterior mean times the gradient of the last sampled training pass"
SMOOTHED_SENSITIVITY = "AdaLoRA's smoothed exp_avg_ipt * exp_avg_unc of |theta * grad|"


@dataclass
class CorrelationLog:
    """The observer of maskings: one entry per masking ({"step", "budget", correlations})."""

    entries: list = field(default_factory=list)


# ----------------------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class TripletLayout:
    """Where every P, lambda, Q entry sits in IVON's flat state and which triplet it scores."""

    layers: list[SVDLayer]
    index: Tensor  # position of each entry in IVON's concatenated flat state
    segment: Tensor  # global triplet index of each entry
    weight: Tensor  # 1 for lambda, 1/out for P, 1/in for Q (means as sums)
    n_triplets: int

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """P, lambda, Q of each layer in turn: the order of every flat vector here."""
        return [p for layer in self.layers for p in (layer.P, layer.lam, layer.Q)]


def flat_offsets(optimizer) -> dict[torch.nn.Parameter, int]:
    """Where each parameter starts in IVON's flat state (its groups' parameters concatenated; of a parameter
    FSDP sharded, this process's rows)."""
    offsets, offset = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p is not None:  # IVON's flat state skips them too
                offsets[p] = offset
                offset += local_shard(p).numel()
    return offsets


def triplet_layout(layers: list[SVDLayer], offsets: dict) -> TripletLayout:
    """The layout of `layers` in a flat state at `offsets`: masking then costs a fixed handful of
    tensor ops, whatever the layer count. Of a layer FSDP sharded by rows, the entries of this process's
    rows (P's rows i, lambda's and Q's rows k), whose sums are then partial (`all_sum` completes them)."""
    index, segment, weight, first = [], [], [], 0
    for layer in layers:
        P, E, Q, r = layer.P, layer.lam, layer.Q, layer.r
        if any(p not in offsets for p in (P, E, Q)):
            raise RuntimeError(f"the IVON optimizer does not hold the adapter parameters of {layer.name}")
        (p0, p1), (e0, e1), (q0, q1) = (shard_rows(p) for p in (P, E, Q))
        # P is (out, r) row-major, Q is (r, in): entry -> its triplet k, weighted for a mean
        for p, k, w in ((P, torch.arange(r).repeat(p1 - p0), 1.0 / P.shape[0]),
                        (E, torch.arange(e0, e1), 1.0),
                        (Q, torch.arange(q0, q1).repeat_interleave(Q.shape[1]), 1.0 / Q.shape[1])):
            index.append(torch.arange(offsets[p], offsets[p] + local_shard(p).numel()))
            segment.append(first + k)
            weight.append(torch.full((local_shard(p).numel(),), w))
        first += r
    device = local_shard(layers[0].lam).device
    return TripletLayout(layers, torch.cat(index).to(device), torch.cat(segment).to(device),
                         torch.cat(weight).to(device), first)


def posterior_state(layout: TripletLayout, optimizer) -> tuple[Tensor, Tensor]:
    """(mu, sigma) of every P, lambda, Q entry, flat in layout order."""
    sigma = torch.cat([
        posterior_sigma_from_hessian(g["hess"], g["ess"], g["weight_decay"]) for g in optimizer.param_groups
    ])[layout.index]
    return torch.cat([local_shard(p).detach().reshape(-1) for p in layout.params]), sigma


def triplet_sum(layout: TripletLayout, score: Tensor) -> Tensor:
    """S_k = s(lambda_k) + mean_i s(P_ik) + mean_j s(Q_kj), as one weighted segment sum; over processes that
    hold shards of the layers, the sums of every process's rows (one all-reduce)."""
    partial = torch.zeros(layout.n_triplets, dtype=score.dtype, device=score.device).index_add_(
        0, layout.segment, score * layout.weight
    )
    return all_sum(partial, layout.params)


def triplets_to_keep(scores: Tensor, n_masked: int) -> Tensor:
    """True for every triplet but the `n_masked` lowest-scoring; ties broken by order (a stable sort)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_masked > 0:
        keep[torch.sort(scores, stable=True).indices[:n_masked]] = False
    return keep


def apply_mask(layout: TripletLayout, keep: Tensor) -> None:
    """lambda_k := 0 for every triplet not kept (of a sharded lambda, in this process's rows)."""
    lambdas = [local_shard(layer.lam) for layer in layout.layers]
    rows = [shard_rows(layer.lam) for layer in layout.layers]
    kept = [k[start:stop] for k, (start, stop) in zip(keep.split([layer.r for layer in layout.layers]), rows)]
    torch._foreach_mul_(lambdas, [k.view(-1, 1).to(lam.dtype) for k, lam in zip(kept, lambdas)])


def rank_pattern(layout: TripletLayout, keep: Tensor) -> dict[str, list[bool]]:
    """peft's rank pattern: per layer's rank key, one flag per triplet."""
    flags, pattern, offset = keep.tolist(), {}, 0
    for layer in layout.layers:
        pattern[layer.rank_key] = flags[offset : offset + layer.r]
        offset += layer.r
    return pattern


# ----------------------------------------------------------------------------- peft glue


class TripletScoring:
    """Triplet scores from IVON's flat state, and the correlation log; mixed into peft's RankAllocator."""

    sensitivity_kind = INSTANT_SENSITIVITY

    def __init__(self, model, peft_config, adapter_name: str, optimizer, correlation_log: CorrelationLog | None):
        super().__init__(model, peft_config, adapter_name)
        self.optimizer = optimizer
        self.correlation_log = correlation_log  # None: no logging
        self.layout: TripletLayout | None = None
        self.step: int | None = None

    def update_and_allocate(self, model, global_step, force_mask=False):
        self.step = global_step  # for the correlation log; peft does not pass the step to mask_to_budget
        return super().update_and_allocate(model, global_step, force_mask)

    def layout_of(self, model) -> TripletLayout:
        """The layout of `model`'s layers, built once (again only if the layers change)."""
        layers = svd_layers(model, self.adapter_name)
        if self.layout is None or [id(x.lam) for x in self.layout.layers] != [id(x.lam) for x in layers]:
            self.layout = triplet_layout(layers, flat_offsets(self.optimizer))
        return self.layout

    def triplet_scores(self, model, criterion: str | None = None) -> Tensor:
        """S_k under `criterion` (default: the allocator's) of every triplet, in `svd_layers` order."""
        layout = self.layout_of(model)
        mu, sigma = posterior_state(layout, self.optimizer)
        return triplet_sum(layout, posterior_score(criterion or self.criterion, mu, sigma))

    def sensitivity_scores(self, model) -> Tensor:
        """Elementwise sensitivity, flat in layout order (here: |mu * grad|, 0 where no gradient is held)."""
        return torch.cat([
            (local_shard(p) * local_shard(p.grad)).abs().reshape(-1) if p.grad is not None
            else torch.zeros(local_shard(p).numel(), device=local_shard(p).device)
            for p in self.layout_of(model).params
        ])

    @torch.no_grad()
    def log_correlations(self, model, budget: int) -> None:
        """Append Spearman correlations of the triplet scores of sensitivity and of each posterior criterion."""
        layout = self.layout_of(model)
        mu, sigma = posterior_state(layout, self.optimizer)
        posterior = {c: triplet_sum(layout, posterior_score(c, mu, sigma)).cpu().numpy() for c in POSTERIOR_CRITERIA}
        sensitivity = triplet_sum(layout, self.sensitivity_scores(model).float()).cpu().numpy()
        self.correlation_log.entries.append(
            {"step": self.step, "budget": int(budget), **importance_correlations(sensitivity, posterior)}
        )


class PosteriorRankAllocator(TripletScoring, RankAllocator):
    """peft's RankAllocator with `s` = a posterior criterion of IVON's state (`importance.posterior_score`).

    Budget schedule, `update_and_allocate` and the final pattern are peft's. Masking keeps exactly
    the budget: peft masks every triplet scoring at or below the k-th lowest score, so tied scores
    (common for `inv_sigma` early on, when IVON's Hessian is still near its initial value
    everywhere) would prune more than asked; here the k lowest are masked, ties broken by order.
    Without ties this is peft's masking exactly (tested against it).
    """

    def __init__(self, model, peft_config, adapter_name: str, optimizer, criterion: str,
                 correlation_log: CorrelationLog | None = None):
        if criterion not in POSTERIOR_CRITERIA:
            raise ValueError(
                f"unknown posterior criterion {criterion!r}: choose one of {', '.join(POSTERIOR_CRITERIA)}"
            )
        super().__init__(model, peft_config, adapter_name, optimizer, correlation_log)
        self.criterion = criterion

    def update_ipt(self, model) -> None:
        """Nothing to accumulate: the posterior is IVON's own state, read only when masking."""

    @torch.no_grad()
    def mask_to_budget(self, model, budget):
        """Mask the `init_bgt - budget` lowest-scoring triplets; returns peft's rank pattern."""
        if self.correlation_log is not None:
            self.log_correlations(model, budget)
        keep = triplets_to_keep(self.triplet_scores(model), self.init_bgt - budget)
        apply_mask(self.layout, keep)
        return rank_pattern(self.layout, keep)


class WholeParameters:
    """What peft's `RankAllocator.mask_to_budget` reads of a model (`named_parameters`), for a model FSDP
    sharded: the adapter's parameters by name, the lambdas gathered whole (copies: peft's masking of them is
    thrown away)."""

    def __init__(self, named: list[tuple[str, Tensor]]):
        self.named = named

    def named_parameters(self):
        return iter(self.named)


class SensitivityRankAllocator(TripletScoring, RankAllocator):
    """peft's own RankAllocator (adalora, adalora-ivon: AdaLoRA's smoothed sensitivity), unchanged, that
    logs at each masking (given a correlation log) how its sensitivity ranks triplets against the posterior
    criteria, and masks a model FSDP sharded.

    On shards, the sensitivity EMAs hold each process's rows (`fast_adalora.ForeachSensitivity`). At a
    masking step their scores are gathered whole (adapter-sized, once per masking), peft's own
    `mask_to_budget` chooses the triplets from them, exactly as in one process, and each process zeroes its
    rows of the lambdas not kept."""

    sensitivity_kind = SMOOTHED_SENSITIVITY
    criterion = None
    _whole_scores: dict[str, Tensor] | None = None

    def sensitivity_scores(self, model) -> Tensor:
        """AdaLoRA's score exp_avg_ipt * exp_avg_unc, flat in layout order."""
        keys = [
            layer.param_name(factor)
            for layer in self.layout_of(model).layers
            for factor in FACTORS  # P, lambda, Q
        ]
        return torch.cat([(self.exp_avg_ipt[k] * self.exp_avg_unc[k]).reshape(-1) for k in keys])

    def _element_score(self, n):
        if self._whole_scores is not None:
            return self._whole_scores[n]
        return super()._element_score(n)

    @torch.no_grad()
    def mask_to_budget(self, model, budget):
        if self.correlation_log is not None:
            self.log_correlations(model, budget)
        named = sensitivity_parameters(model, self.adapter_name)
        if not any(is_sharded(p) for _, p in named):
            return super().mask_to_budget(model, budget)
        # every process gathers the same tensors in the same order (named_parameters' order)
        self._whole_scores = {n: gather_rows(p, local_shard(RankAllocator._element_score(self, n)))
                              for n, p in named if n in self.exp_avg_ipt}
        # peft reads the names of A and B, and masks lambda: only the lambdas are gathered (and their masking
        # thrown away), A and B stand in as their shards
        whole = [(n, gather_rows(p, local_shard(p).clone()) if f"lora_E.{self.adapter_name}" in n else local_shard(p))
                 for n, p in named]
        try:
            pattern = super().mask_to_budget(WholeParameters(whole), budget)
        finally:
            self._whole_scores = None
        for n, p in named:
            if n in pattern:  # lambda: this process's rows of its pattern
                start, stop = shard_rows(p)
                keep = torch.tensor(pattern[n][start:stop], dtype=torch.bool, device=local_shard(p).device)
                local_shard(p).masked_fill_(~keep.view(-1, 1), 0.0)
        return pattern


def install_allocator(peft_model, method: str, optimizer, criterion: str,
                      correlation_log: CorrelationLog | None = None) -> RankAllocator | None:
    """Give a peft AdaLoRA model the method's allocator (`methods.Method.allocator`): the posterior
    one reading `optimizer` (IVON), or peft's sensitivity one, replaced by the logging one where a
    `correlation_log` is given or the model is FSDP sharded. Returns the allocator, None for a method without
    AdaLoRA."""
    kind = get_method(method).allocator
    if kind is None:
        return None
    tuner = peft_model.base_model
    adapter = tuner.trainable_adapter_name
    if kind == "posterior":
        tuner.rankallocator = PosteriorRankAllocator(tuner.model, tuner.peft_config[adapter], adapter, optimizer,
                                                     criterion, correlation_log)
    elif correlation_log is not None or model_is_sharded(tuner.model):
        tuner.rankallocator = SensitivityRankAllocator(tuner.model, tuner.peft_config[adapter], adapter, optimizer,
                                                       correlation_log)
    return tuner.rankallocator


def install_posterior_allocator(peft_model, optimizer, criterion: str,
                                correlation_log: CorrelationLog | None = None) -> PosteriorRankAllocator:
    """Replace the RankAllocator of a peft AdaLoRA model by a posterior one reading `optimizer` (IVON)."""
    return install_allocator(peft_model, "bayes-adalora", optimizer, criterion, correlation_log)
