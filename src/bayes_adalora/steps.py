"""One optimizer step, behind one small interface: AdamW's, and IVON's sampled step with K samples.

A step is two calls: `gradients(forward_backward)` leaves the step's gradients in the parameters and
returns its loss, `update()` moves the weights. The CLI loop calls both; the Trainer integration calls
`gradients` from its `training_step` and lets the Trainer call the optimizer; the speed benchmark
times inside `forward_backward`. `IVONStep.gradients` is the one place that enters IVON's
`sampled_params`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ForwardBackward = Callable[[], torch.Tensor]  # runs forward and backward, returns the loss


def fill_missing_grads(optimizer) -> None:
    """IVON reads the gradient of every parameter it holds; one the loss did not reach gets zeros."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)


class AdamWStep:
    """A plain step: gradients at the weights themselves."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def gradients(self, forward_backward: ForwardBackward) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        return forward_backward().detach()

    def update(self) -> None:
        self.optimizer.step()


class IVONStep:
    """IVON's step: gradients at `samples` draws from the posterior, which IVON averages.

    For each draw: weights := a sample of N(mu, sigma^2), forward and backward there, the weights
    restored to mu. The returned loss is the mean over the draws.
    """

    def __init__(self, optimizer, samples: int):
        self.optimizer = optimizer
        self.samples = samples

    def gradients(self, forward_backward: ForwardBackward) -> torch.Tensor:
        losses = []
        for _ in range(self.samples):
            with self.optimizer.sampled_params(train=True):
                self.optimizer.zero_grad(set_to_none=True)
                loss = forward_backward()
                fill_missing_grads(self.optimizer)
            losses.append(loss.detach())
        return torch.stack(losses).mean()

    def update(self) -> None:
        self.optimizer.step()


def make_step(optimizer, uses_ivon: bool, samples: int = 1) -> AdamWStep | IVONStep:
    return IVONStep(optimizer, samples) if uses_ivon else AdamWStep(optimizer)
