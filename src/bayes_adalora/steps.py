"""One optimizer step, behind one small interface: AdamW's, and IVON's sampled step with K samples.

A step is two calls: `gradients(forward_backward)` leaves the step's gradients in the parameters and
returns its loss, `update()` moves the weights. The Trainer integration (and with it the command line)
calls `gradients` from its `training_step` and lets the Trainer call the optimizer; the speed benchmark
calls both and times inside `forward_backward`. `IVONStep.gradients` is the one place that draws IVON's training
samples (ivon-opt's `sampled_params`, step by step and exception-safe).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
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


class NoiseStream:
    """A random stream of IVON's own for its posterior samples, apart from the one dropout draws from.

    Under several processes IVON (`sync=True`) needs the same noise in every process: its Hessian
    estimate averages noise x the all-reduced gradient, and noise that differs between processes would
    shrink it by about the process count. Seeding the processes alike is not enough: dropout draws as
    many numbers as its input has elements, so shards of unequal size (an epoch's short last batch, or
    the Trainer's per-process padding) leave the global generators at different places. IVON's draws
    therefore come from this stream, seeded from the run's seed alike everywhere and advanced only by
    them; the global generators are left as they were. It is the same in one process, so one process and
    several draw the same noise, and its `state` goes into checkpoints for an exact resume.
    """

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        # not `seed` itself: the first draws would repeat those that initialised the new weights
        own_seed = int(np.random.SeedSequence([seed, 0x1F0]).generate_state(1, np.uint64)[0] >> 1)
        with self._forked():  # seeds only this stream's generators, then puts them back
            torch.default_generator.manual_seed(own_seed)
            for index in self._cuda():
                with torch.cuda.device(index):
                    torch.cuda.manual_seed(own_seed)
            self.state = self._current()

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from a checkpoint's `state` (for the generators this stream draws from; a CPU run's
        checkpoint resumed on a GPU keeps the GPU's freshly seeded state)."""
        self.state = {key: state.get(key, current) for key, current in self.state.items()}

    def _cuda(self) -> list[int]:
        if self.device.type != "cuda":
            return []
        return [self.device.index if self.device.index is not None else torch.cuda.current_device()]

    def _forked(self):
        return torch.random.fork_rng(devices=self._cuda())

    def _current(self) -> dict[str, torch.Tensor]:
        state = {"cpu": torch.get_rng_state()}
        for index in self._cuda():
            state["cuda"] = torch.cuda.get_rng_state(index)
        return state

    @contextmanager
    def drawing(self) -> Iterator[None]:
        """Inside: the global generators (the CPU's and a CUDA device's; other accelerators keep their own)
        are this stream; after: as before."""
        with self._forked():
            torch.set_rng_state(self.state["cpu"])
            for index in self._cuda():
                torch.cuda.set_rng_state(self.state["cuda"], index)
            yield
            self.state = self._current()


class IVONStep:
    """IVON's step: gradients at `samples` draws from the posterior, which IVON averages.

    For each draw: weights := a sample of N(mu, sigma^2), forward and backward there, the weights
    restored to mu. The returned loss is the mean over the draws. With a `NoiseStream`, the draws come
    from it (the CLI and the Trainer always pass one); without, from the global generator.
    """

    def __init__(self, optimizer, samples: int, noise: NoiseStream | None = None):
        self.optimizer = optimizer
        self.samples = samples
        self.noise = noise

    def gradients(self, forward_backward: ForwardBackward) -> torch.Tensor:
        """ivon-opt's `sampled_params(train=True)` per draw, made exception-safe: where `forward_backward`
        raises (out of memory, say, which `auto_find_batch_size` retries), the weights go back to the
        mean and the step's collected samples are dropped, rather than training on from mean + noise."""
        losses = []
        for _ in range(self.samples):
            with self.noise.drawing() if self.noise is not None else nullcontext():
                mean, noise = self.optimizer._sample_params()
            try:
                self.optimizer.zero_grad(set_to_none=True)
                loss = forward_backward()
                fill_missing_grads(self.optimizer)
            except BaseException:
                self.optimizer._restore_param_average(False, mean, noise)
                self.optimizer._reset_samples()
                raise
            self.optimizer._restore_param_average(True, mean, noise)  # collects the gradient sample
            losses.append(loss.detach())
        return torch.stack(losses).mean()

    def update(self) -> None:
        self.optimizer.step()
