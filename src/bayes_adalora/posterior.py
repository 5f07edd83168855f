"""Views of IVON's state as a posterior: sigma per parameter (the file it is saved to: `adapters.py`).

ivon-opt keeps its Hessian estimate `h` as one flat vector per parameter group; these functions
map it back to each parameter's shape. Posterior: N(mu, sigma^2), mu = the weights,
sigma^2 = 1 / (ess * (h + weight_decay)).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .errors import UserError
from .sharding import local_shard


def posterior_sigma_from_hessian(hess: Tensor, ess: float, weight_decay: float) -> Tensor:
    """sigma = 1 / sqrt(ess * (h + weight_decay)), IVON's posterior standard deviation; in float32 at least
    (in fp16, ess * h overflows past 65504 for any training set of that size, and sigma would be 0)."""
    if hess.dtype in (torch.float16, torch.bfloat16):
        hess = hess.float()
    return torch.rsqrt(ess * (hess + weight_decay))


def hessian_views(optimizer) -> Iterator[tuple[nn.Parameter, Tensor, dict]]:
    """(parameter, its slice of the group's flat Hessian reshaped like it, the group); an optimizer that keeps
    no Hessian (AdamW) is refused: it has no posterior."""
    if not all("hess" in group for group in optimizer.param_groups):
        raise UserError(f"the optimizer is {type(optimizer).__module__}.{type(optimizer).__name__}, not IVON: it "
                        f"keeps no posterior (no Hessian estimate) to draw from; train with ivon.IVON "
                        f"(--method bayes-adalora or adalora-ivon)")
    for group in optimizer.param_groups:
        offset = 0
        for p in group["params"]:
            if p is None:
                continue
            local = local_shard(p)  # of a parameter FSDP sharded, this process's rows
            n = local.numel()
            yield p, group["hess"][offset : offset + n].view_as(local), group
            offset += n


def posterior_hessian(optimizer) -> dict[nn.Parameter, Tensor]:
    """IVON's Hessian estimate h for each parameter, in the parameter's shape (views, no copy)."""
    return {p: h for p, h, _ in hessian_views(optimizer)}


def posterior_sigma(optimizer, params: set[nn.Parameter] | None = None) -> dict[nn.Parameter, Tensor]:
    """IVON's posterior sigma for each parameter (or for those in `params`), in the parameter's shape."""
    return {
        p: posterior_sigma_from_hessian(h, group["ess"], group["weight_decay"])
        for p, h, group in hessian_views(optimizer)
        if params is None or p in params
    }
