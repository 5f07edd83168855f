"""Schedules as pure functions of the step: the paper's two-phase learning-rate multiplier (transformers'
schedules serve the others) and AdaLoRA's default phases."""

from __future__ import annotations


def two_phase(step: int, warmup_steps: int, const_until: int, first: float, second: float, total_steps: int) -> float:
    """The paper's two-phase IVON multiplier: 0 -> `first` over the warm-up, `first` until step
    `const_until`, then a linear fall from `second` to 0 at `total_steps`."""
    if step < warmup_steps:
        return first * step / max(1, warmup_steps)
    if step < const_until:
        return first
    return second * max(0.0, (total_steps - step) / max(1, total_steps - const_until))


# The paper's GLUE runs (its recipes) spend 9-18% of a run at the initial budget
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
