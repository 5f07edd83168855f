"""Multi-process training through accelerate (DDP): what each process trains on and who writes.

Every process reads the same global batch (same seed, same order) and trains on its contiguous
share of it, DDP averages the gradients (each process's loss is weighed so that the mean is the global
batch's: by its share of the rows, `kinds.ClassifierKind.loss_scale`, or of the scored tokens,
`kinds.CausalLMKind.loss_kwargs`), and IVON runs with `sync=True`. Every process
therefore holds the same weights and the same IVON state, and so computes the same rank masks; this is
checked at the end of a run. Only the main process writes files and shows progress.
"""

from __future__ import annotations

import hashlib
import os
import pickle

import torch

from .errors import UserError


def launched_distributed() -> bool:
    """True under `accelerate launch` or `torchrun` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class Processes:
    """One process of a (possibly single-process) run."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.world = accelerator.num_processes if accelerator else 1
        self.is_main = self.rank == 0

    @classmethod
    def start(cls, device: torch.device, batch_size: int) -> Processes:
        if not launched_distributed():
            return cls()
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=device.type == "cpu")
        procs = cls(accelerator)
        if batch_size % procs.world:
            raise UserError(
                f"--batch-size {batch_size} is the global batch and must divide among {procs.world} processes"
            )
        return procs

    @property
    def device(self) -> torch.device | None:
        return self.accelerator.device if self.accelerator else None

    def shard(self, batch: dict) -> dict:
        """This process's contiguous share of a global batch."""
        if self.world == 1:
            return batch
        size = next(iter(batch.values())).shape[0]
        if size % self.world:  # the last, short batch of an epoch: share it as evenly as possible
            bounds = [size * r // self.world for r in range(self.world + 1)]
        else:
            bounds = [size // self.world * r for r in range(self.world + 1)]
        lo, hi = bounds[self.rank], bounds[self.rank + 1]
        return {k: v[lo:hi] for k, v in batch.items()}

    def wrap(self, model):
        """DDP-wrapped model for the forward pass (the unwrapped one stays for peft's allocator)."""
        return self.accelerator.prepare_model(model) if self.accelerator else model

    def mean(self, value: float) -> float:
        """The mean of `value` over the processes (each one's loss on its share: the batch's loss)."""
        if self.world == 1:
            return value
        return self.accelerator.reduce(torch.tensor(value, device=self.accelerator.device), "mean").item()

    def same_everywhere(self, value) -> bool:
        """Whether every process holds an equal `value` (compared by a digest of its pickle)."""
        if self.world == 1:
            return True
        from accelerate.utils import gather_object

        digest = hashlib.sha256(pickle.dumps(value)).hexdigest()
        return len(set(gather_object([digest]))) == 1

    def wait(self) -> None:
        if self.accelerator:
            self.accelerator.wait_for_everyone()
