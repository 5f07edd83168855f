"""Schedules as pure functions of the step: learning-rate multipliers and AdaLoRA's default phases."""

from __future__ import annotations


def linear_warmup_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: 0 -> 1 linearly over `warmup_steps`, then 1 -> 0 linearly at `total_steps`.

    `step` counts optimizer steps taken before this one (0 for the first update), as in
    transformers' `get_linear_schedule_with_warmup`.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def two_phase(step: int, warmup_steps: int, const_until: int, first: float, second: float, total_steps: int) -> float:
    """The paper's two-phase IVON multiplier: 0 -> `first` over the warm-up, `first` until step
    `const_until`, then a linear fall from `second` to 0 at `total_steps`."""
    if step < warmup_steps:
        return first * step / max(1, warmup_steps)
    if step < const_until:
        return first
    return second * max(0.0, (total_steps - step) / max(1, total_steps - const_until))


def constant_warmup(step: int, warmup_steps: int) -> float:
    """LR multiplier: 0 -> 1 linearly over `warmup_steps`, then 1 (from the first step if there is
    no warm-up)."""
    if step >= warmup_steps:
        return 1.0
    return step / warmup_steps


def default_adalora_phases(total_steps: int) -> tuple[int, int, int]:
    """(tinit, tfinal, delta_t) that scale with the run: 10% warm-up at the initial budget, 30% at the
    final pattern, and about 60 masking steps in the 60% of the run where the budget falls.

    The paper's GLUE runs spend about 10-15% in tinit and 30-50% in tfinal.
    """
    tinit = int(0.1 * total_steps)
    tfinal = int(0.3 * total_steps)
    delta_t = max(1, (total_steps - tinit - tfinal) // 60)
    return tinit, tfinal, delta_t
