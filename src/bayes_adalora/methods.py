"""The one registry of fine-tuning methods: optimizer family, adapter kind, allocator kind, default lr.

Every branch on a method reads these fields; no other module lists method names.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class Method:
    """What a method is made of.

    `optimizer`: "ivon" (IVON's sampled step, a posterior) or "adamw", a key of `build.OPTIMIZERS` (its
    factory) and `build.STEPS`. `adapter`: "adalora" (peft's SVD triplets with a rank budget), "lora" (a
    fixed rank), keys of `build.ADAPTERS` (their peft configs), or None (every weight trained).
    `allocator`: who scores AdaLoRA's triplets, "posterior" (IVON's posterior, `allocator.py`) or
    "sensitivity" (peft's own smoothed |theta * grad|); None without AdaLoRA. `default_lr`: the peak
    learning rate when --learning-rate is not given (tuned on MiniLM / SST-2, see README); IVON's is for an initial
    Hessian of 1, and `TrainConfig.resolved_lr` divides it by --ivon-hess-init.
    """

    name: str
    optimizer: str
    adapter: str | None
    allocator: str | None
    default_lr: float

    @property
    def uses_ivon(self) -> bool:
        return self.optimizer == "ivon"

    @property
    def uses_adalora(self) -> bool:
        return self.adapter == "adalora"

    @property
    def reads_posterior(self) -> bool:
        """Its ranks come from IVON's posterior (the only method that takes --criterion)."""
        return self.allocator == "posterior"

    @property
    def family(self) -> str:
        """The group that shares a learning-rate scale: "ivon", else the adapter kind, else "full"."""
        return "ivon" if self.uses_ivon else self.adapter or "full"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(name="bayes-adalora", optimizer="ivon", adapter="adalora", allocator="posterior", default_lr=3.0),
        Method(name="adalora-ivon", optimizer="ivon", adapter="adalora", allocator="sensitivity", default_lr=3.0),
        Method(name="adalora", optimizer="adamw", adapter="adalora", allocator="sensitivity", default_lr=2e-3),
        Method(name="lora", optimizer="adamw", adapter="lora", allocator=None, default_lr=1e-3),
        Method(name="full", optimizer="adamw", adapter=None, allocator=None, default_lr=3e-5),
    )
}
METHOD_NAMES = tuple(METHODS)
IVON_METHODS = tuple(name for name, m in METHODS.items() if m.uses_ivon)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]
