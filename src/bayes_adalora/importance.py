"""Importance criteria: pure elementwise functions of tensors, no model, no optimizer, no I/O.

Posterior criteria read a diagonal Gaussian posterior theta ~ N(mu, sigma^2) (IVON's), the
sensitivity criterion is AdaLoRA's smoothed |theta * grad| times its uncertainty.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

POSTERIOR_CRITERIA = ("snr_abs", "snr", "mean_abs", "inv_sigma", "e_abs")
DEFAULT_CRITERION = "snr_abs"

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _folded_excess(r: Tensor) -> Tensor:
    """d(r) = E|z| - r for z ~ N(r, 1), r >= 0, computed without cancellation.

    E|z| = sqrt(2/pi) exp(-r^2/2) + r erf(r/sqrt2) = r + exp(-r^2/2) (sqrt(2/pi) - r erfcx(r/sqrt2)),
    where erfcx(x) = exp(x^2) erfc(x) stays finite for large x, so d underflows to 0 instead of
    being the difference of two numbers near r. At r = inf (sigma 0, or |mu| past the dtype's range) d is
    0, not the inf * 0 of the formula.
    """
    d = torch.exp(-0.5 * r * r) * (_SQRT_2_OVER_PI - r * torch.special.erfcx(r / math.sqrt(2.0)))
    return torch.where(torch.isinf(r), 0.0, d)


def _folded_variance(r: Tensor, d: Tensor) -> Tensor:
    """Var|z| = 1 - d (2r + d) for z ~ N(r, 1) (see `folded_normal_std`): 1 at r = inf, not 1 - 0 * inf."""
    return torch.where(torch.isinf(r), 1.0, 1.0 - d * (2.0 * r + d))


def folded_normal_mean(mu: Tensor, sigma: Tensor) -> Tensor:
    """E|theta| = sigma sqrt(2/pi) exp(-mu^2 / (2 sigma^2)) + mu erf(mu / (sigma sqrt 2))."""
    r = mu.abs() / sigma
    return mu.abs() + sigma * _folded_excess(r)


def folded_normal_std(mu: Tensor, sigma: Tensor) -> Tensor:
    """sd|theta| = sqrt(mu^2 + sigma^2 - E|theta|^2), computed as sigma sqrt(1 - d (2r + d)).

    With E|theta| = sigma (r + d) and r = |mu|/sigma, the variance is
    sigma^2 (r^2 + 1 - (r + d)^2) = sigma^2 (1 - d (2r + d)): no difference of large numbers.
    """
    r = mu.abs() / sigma
    d = _folded_excess(r)
    return sigma * torch.sqrt(_folded_variance(r, d))


def snr_abs(mu: Tensor, sigma: Tensor) -> Tensor:
    """E|theta| / sd|theta|: the signal-to-noise ratio of the magnitude (the paper's default).

    It depends on r = |mu|/sigma only: (r + d) / sqrt(1 - d (2r + d)); at mu = 0 it is
    sqrt(2/pi) / sqrt(1 - 2/pi) and it tends to r for large r.
    """
    r = mu.abs() / sigma
    d = _folded_excess(r)
    return (r + d) / torch.sqrt(_folded_variance(r, d))


def posterior_score(criterion: str, mu: Tensor, sigma: Tensor) -> Tensor:
    """The elementwise importance of weights with posterior N(mu, sigma^2) under `criterion`.

    snr_abs = E|theta| / sd|theta|, snr = |mu| / sigma, mean_abs = |mu|, inv_sigma = 1 / sigma,
    e_abs = E|theta| (folded normal). Computed in at least float32.
    """
    if criterion not in POSTERIOR_CRITERIA:
        raise ValueError(f"unknown posterior criterion {criterion!r}: choose one of {', '.join(POSTERIOR_CRITERIA)}")
    dtype = torch.promote_types(mu.dtype, torch.float32)
    mu, sigma = mu.to(dtype), sigma.to(dtype)
    if criterion == "snr_abs":
        return snr_abs(mu, sigma)
    if criterion == "snr":
        return mu.abs() / sigma
    if criterion == "mean_abs":
        return mu.abs()
    if criterion == "inv_sigma":
        return torch.ones_like(mu) / sigma
    return folded_normal_mean(mu, sigma)
