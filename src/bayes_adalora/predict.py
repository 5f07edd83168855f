"""Predictions of a model over data loaders: at the weights (IVON: the posterior mean), at draws from
IVON's posterior, and the metrics of both. Used by training's evaluations and by `evaluate`."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from contextlib import contextmanager

import torch
from torch import nn

from .adapters import lambda_parameters
from .evaluation import mc_predictive, point_predictive, predictive_metrics
from .posterior import posterior_sigma
from .sharding import gather_rows, is_sharded, local_shard, reshard, shard_rows
from .tasks import TaskSpec


@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) over a loader, at the current weights (IVON: the posterior mean)."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels.append(batch.pop("labels").cpu())
            with autocast:
                logits.append(model(**batch).logits.float().cpu())
    finally:  # an error mid-way (out of memory, say) leaves a caller who catches it the mode it had
        model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: nn.Module, loaders: dict, spec: TaskSpec, device, autocast) -> dict:
    """Official metrics on every dev split, named as in results.json; for classification also
    calibration and selective prediction (ece, nll, brier, aurc, accuracy_at_coverage)."""
    out = {}
    for split, loader in loaders.items():
        logits, labels = predict(model, loader, device, autocast)
        out.update(predictive_metrics(spec, split, point_predictive(spec, logits.numpy()), labels.numpy()))
    return out


@contextmanager
def posterior_draw(model: nn.Module, sigma: dict[str, torch.Tensor], generator: torch.Generator):
    """The weights named in `sigma` set to one draw mu + sigma * eps of the posterior, mu restored after.

    eps comes from `generator` on the CPU, so a seed gives the same draws on every device. Pruned
    AdaLoRA triplets stay pruned: the noise of a lambda that is exactly 0 in mu is dropped. Of a parameter
    FSDP sharded (`sigma` then holds this process's rows, as `named_posterior_sigma` gives it), the draw is
    one process's whole draw, of which this process adds its rows, in place (FSDP owns their memory).
    """
    lambdas = lambda_parameters(model)
    means, sharded = {}, {}
    # FSDP with shard_grad_op leaves the blocks gathered after a forward: the shards again, before a draw is
    # added to them (a gathered block would not see it) and before they are restored
    reshard(model)
    try:  # the setup too: an error half-way through it (out of memory, say) restores what it had changed
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in sigma:
                    eps = torch.randn(p.shape, generator=generator)
                    if is_sharded(p):
                        start, stop = shard_rows(p)
                        local = local_shard(p)
                        rows = eps[start:stop].to(local.device, local.dtype)
                        noise = sigma[name].to(local.device, local.dtype) * rows
                        if id(p) in lambdas:
                            noise *= local != 0
                        sharded[name] = local.clone()
                        local.add_(noise)
                        continue
                    noise = sigma[name].to(p.device, p.dtype) * eps.to(p.device, p.dtype)
                    if id(p) in lambdas:
                        noise *= p != 0
                    means[name] = p.data
                    p.data = p.data + noise
        yield
    finally:
        reshard(model)
        with torch.no_grad():  # a DTensor's local view is written in place: not under autograd
            for name, p in model.named_parameters():
                if name in means:
                    p.data = means[name]
                elif name in sharded:
                    local_shard(p).copy_(sharded[name])


def predict_sampled(model: nn.Module, loaders: dict, device, autocast, sigma: dict[str, torch.Tensor],
                    samples: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per split, (logits of each posterior draw (K, N, C), labels): K draws, each predicting every split."""
    generator = torch.Generator().manual_seed(seed)
    draws: dict[str, list] = {split: [] for split in loaders}
    labels = {}
    for _ in range(samples):
        with posterior_draw(model, sigma, generator):
            for split, loader in loaders.items():
                logits, labels[split] = predict(model, loader, device, autocast)
                draws[split].append(logits)
    return {split: (torch.stack(draws[split]), labels[split]) for split in loaders}


def evaluate_sampled(model: nn.Module, loaders: dict, spec: TaskSpec, device, autocast,
                     sigma: dict[str, torch.Tensor], samples: int, seed: int) -> dict:
    """`evaluate`'s metrics of the posterior predictive over `samples` draws, and "samples": K."""
    out = {}
    for split, (draws, labels) in predict_sampled(model, loaders, device, autocast, sigma, samples, seed).items():
        out.update(predictive_metrics(spec, split, mc_predictive(spec, draws.numpy()), labels.numpy()))
    return {**out, "samples": samples}


@torch.no_grad()
def posterior_predictive(model: nn.Module, posterior, inputs: dict, samples: int = 16, seed: int = 0) -> torch.Tensor:
    """Class probabilities of IVON's posterior predictive for one batch, for a training loop of your own:
    p(y | x) = (1/K) sum_k softmax(f(x; theta_k)), theta_k = mu + sigma * eps_k, over K = `samples` draws.

    `model` holds the posterior mean (the trained weights); `posterior` is its IVON optimizer, or the sigma
    of each trained parameter by name (`adapters.load_posterior_sigma` of a run or an exported adapter, for a
    model loaded with stock peft); `inputs` are the model's keyword inputs (labels, if any, are ignored).
    Pruned AdaLoRA triplets stay pruned in every draw (`posterior_draw`); eps is drawn from a CPU generator
    seeded with `seed`. Returns a tensor shaped like the logits (N, C), or (N, T, V) for a causal LM; the
    model is in eval mode meanwhile.
    """
    if isinstance(samples, bool) or not isinstance(samples, numbers.Integral) or samples < 1:
        raise ValueError(f"samples must be a whole number of posterior draws, at least 1, got {samples!r}")
    sigma = dict(posterior) if isinstance(posterior, Mapping) else named_posterior_sigma(model, posterior)
    generator = torch.Generator().manual_seed(seed)
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    was_training = model.training
    model.eval()
    total = None  # log sum_k p_k, accumulated draw by draw: one (N, C) or (N, T, V) tensor, not K of them
    try:
        for _ in range(samples):
            with posterior_draw(model, sigma, generator):
                log_probs = torch.log_softmax(model(**inputs).logits.double(), dim=-1)
            total = log_probs if total is None else torch.logaddexp(total, log_probs)
    finally:
        model.train(was_training)
    return (total - math.log(samples)).exp().float()


def named_posterior_sigma(model: nn.Module, optimizer, whole: bool = False) -> dict[str, torch.Tensor]:
    """IVON's posterior sigma of every trained parameter, keyed by its name in `model` (as in posterior.safetensors);
    of a parameter FSDP sharded, this process's rows, or with `whole` the whole tensor (every process must call
    it then: it gathers)."""
    names = {p: n for n, p in model.named_parameters()}
    return {names[p]: gather_rows(p, s) if whole else s for p, s in posterior_sigma(optimizer).items()}
