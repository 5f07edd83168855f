"""Schedules as pure functions of the step: learning-rate multipliers and AdaLoRA's default phases."""

from __future__ import annotations

import math


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


def cosine_warmup_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: 0 -> 1 linearly over `warmup_steps`, then half a cosine from 1 to 0 at `total_steps`,
    as transformers' `get_cosine_schedule_with_warmup`."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def constant_warmup(step: int, warmup_steps: int) -> float:
    """LR multiplier: 0 -> 1 linearly over `warmup_steps`, then 1 (from the first step if there is
    no warm-up)."""
    if step >= warmup_steps:
        return 1.0
    return step / warmup_steps


# The paper's GLUE runs (shared/recipes/paper-glue.md) spend 9-18% of a run at the initial budget
# (median 13%), 44-58% at the final pattern (median 48%), and mask 64-1500 times while the budget
# falls (median about 230).
PAPER_TINIT_SHARE = 0.15
PAPER_TFINAL_SHARE = 0.45
PAPER_MASKINGS = 200


def default_adalora_phases(total_steps: int) -> tuple[int, int, int]:
    """(tinit, tfinal, delta_t) in the paper's proportions: 15% of the run at the initial budget,
    45% at the final pattern, and a masking every delta_t steps of the 40% between, about 200 times
    (every step in a fall shorter than that)."""
    tinit = int(PAPER_TINIT_SHARE * total_steps)
    tfinal = int(PAPER_TFINAL_SHARE * total_steps)
    delta_t = max(1, (total_steps - tinit - tfinal) // PAPER_MASKINGS)
    return tinit, tfinal, delta_t


def masking_steps(total_steps: int, tinit: int, tfinal: int, delta_t: int) -> tuple[int, int] | None:
    """The first and the last step at which AdaLoRA masks by score while its budget falls: the steps after
    `tinit` and up to `total_steps - tfinal` that `delta_t` divides (peft's `budget_schedule`); None if none."""
    first = (tinit // delta_t + 1) * delta_t
    last = (total_steps - tfinal) // delta_t * delta_t
    return (first, last) if first <= last else None
