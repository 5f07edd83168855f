"""IVON's settings that follow the run: the Hessian average's horizon (`--ivon-beta2 auto`) and a
Hessian started from the data (`--ivon-hess-init auto`). Pure functions of numbers and tensors.

Why: at ivon-opt's defaults (beta2 0.99999, hess_init 1) a run of a few hundred steps puts under 1% of
data into IVON's Hessian average, so sigma stays at its prior 1/sqrt(ess * hess_init) and every
posterior criterion ranks by magnitude alone.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import Tensor

AUTO = "auto"
BETA2_HORIZONS = 10.0  # Hessian time constants per run: 1 - beta2 = 10 / steps
BETA2_MIN = 0.9  # the shortest horizon (10 steps), for runs under 100 steps


class NumberOrAuto:
    """The type of a setting that takes a number or `auto`: called on a command line's text (by argparse,
    or by `HfArgumentParser` for a dataclass field annotated with it), it gives a float or "auto"."""

    def __new__(cls, text: str | float) -> float | str:  # type: ignore[misc]
        if text == AUTO:
            return AUTO
        try:
            return float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected a number or {AUTO}, got {text!r}") from None


def auto_beta2(total_steps: int) -> float:
    """beta2 whose Hessian average spans a tenth of the run, 1 - beta2 = 10 / steps (at most 0.1).

    The data's share of the average after t steps is 1 - beta2^t ~ 1 - exp(-10 t / steps): 78% at the
    first masking step (15% of the run), 99.6% at the last (55%). The paper's 50k-step runs at 0.99999
    had a horizon of 2 runs instead.
    """
    if total_steps < 1:
        raise ValueError(f"a run has at least one step, got {total_steps}")
    return max(BETA2_MIN, 1.0 - BETA2_HORIZONS / total_steps)


def resolve_beta2(setting: float | str, total_steps: int) -> float:
    """The number IVON runs with: `setting` itself, or `auto_beta2` of the run's length."""
    return auto_beta2(total_steps) if setting == AUTO else float(setting)


def data_share(beta2: float, steps: int) -> float:
    """The share of IVON's Hessian average that comes from data after `steps` updates: 1 - beta2^steps."""
    return -math.expm1(steps * math.log(beta2)) if beta2 > 0 else 1.0


def fisher_diagonal(gradients: list[Tensor], batch_size: int) -> Tensor:
    """The empirical Fisher's diagonal per example from mini-batch mean gradients g_1..g_K of batches of
    size B: F = B * mean_k(g_k^2) (for a zero mean gradient, E[B g^2] is the per-example E[g_i^2])."""
    stacked = torch.stack([g.float() for g in gradients])
    return batch_size * stacked.square().mean(0)
