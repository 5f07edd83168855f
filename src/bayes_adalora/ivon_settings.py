"""IVON's settings that follow the run: the Hessian average's horizon (`--ivon-beta2 auto`) and the
effective sample size that follows the adapter's size (`--ivon-ess auto`), and the type that reads a
number or a word from a command line. Pure functions of numbers.

Why: at ivon-opt's defaults (beta2 0.99999, hess_init 1) a run of a few hundred steps puts under 1% of
data into IVON's Hessian average, so sigma stays at its prior 1/sqrt(ess * hess_init) and every
posterior criterion ranks by magnitude alone.
"""

from __future__ import annotations

import math

AUTO = "auto"
TRAIN_SIZE = "train-size"  # --ivon-ess: the training-set size, the paper's
ESS_PER_PARAMETER = 10.0  # --ivon-ess auto: at least this many per trainable parameter
BETA2_HORIZONS = 10.0  # Hessian time constants per run: 1 - beta2 = 10 / steps
BETA2_MIN = 0.9  # the shortest horizon (10 steps), for runs under 100 steps


class NumberOrWord:
    """The type of a setting that takes a number or a word (`auto`): called on a command line's text (by
    argparse, or by `HfArgumentParser` for a dataclass field annotated with it), it gives a float where the
    text is a number, else the text itself, which the field's check accepts or refuses."""

    def __new__(cls, text: str | float) -> float | str:  # type: ignore[misc]
        try:
            return float(text)
        except (TypeError, ValueError):
            return str(text)


def auto_ess(train_examples: int, trainable_parameters: int) -> float:
    """`--ivon-ess auto`: the training-set size, or `ESS_PER_PARAMETER` per trainable parameter where larger.

    Why: IVON's draws have variance 1 / (ess (h + wd)) per weight, so in a quadratic model of the loss they
    add sum_i h_i sigma_i^2 / 2 <= parameters / (2 ess) nats to the expected training loss. At ess = the
    training-set size, a 254k-parameter adapter on MRPC's 3,302 held-out-split rows may pay 38 nats, and its
    sampled loss rose from 0.8 to 28 once the Hessian followed the data; at 10 per parameter, at most 0.05.
    """
    if train_examples < 1 or trainable_parameters < 1:
        raise ValueError(f"auto ess needs examples and parameters, got {train_examples} and {trainable_parameters}")
    return float(max(train_examples, ESS_PER_PARAMETER * trainable_parameters))


def resolve_ess(setting: float | str | None, train_examples: int, trainable_parameters: int | None) -> float:
    """The ess IVON runs with: `setting` itself; the training-set size for `train-size` (or None, a run
    planned before auto existed); `auto_ess` for `auto`, which needs `trainable_parameters`."""
    if setting == AUTO:
        if trainable_parameters is None:
            raise ValueError("--ivon-ess auto follows the adapter's size: give the plan trainable_parameters")
        return auto_ess(train_examples, trainable_parameters)
    if setting is None or setting == TRAIN_SIZE:
        return float(train_examples)
    return float(setting)


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

