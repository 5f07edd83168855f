"""`AdaLoraCheckpoints`: the Trainer mixin whose checkpoints of an AdaLoRA model resume (the adapter
untrimmed, peft's allocator state, IVON's step count and noise stream) and load as the best model."""

from __future__ import annotations

import os
from contextlib import contextmanager

import ivon
import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .adapters import adalora_settings, adalora_tuner, rank_pattern, remask, set_rank_pattern
from .checkpoint import allocator_state, load_allocator_state, place_ivon_state
from .models import causal_lm_token_loss
from .trainer_callback import RankAllocationCallback

ADALORA_STATE = "adalora_state.pt"  # in a Trainer checkpoint: the allocator state and IVON's step count


class AdaLoraCheckpoints:
    """A Trainer mixin: checkpoints of an AdaLoRA model that `resume_from_checkpoint` and
    `load_best_model_at_end` read back.

    A checkpoint holds the adapter untrimmed (at `init_r`, pruned triplets as zero lambdas; still a
    valid peft adapter) and `adalora_state.pt`: peft's allocator state (its EMAs and rank pattern), IVON's
    `current_step`, which its `state_dict` lacks, and IVON's noise stream. The Trainer keeps the rest:
    optimizer and scheduler state, RNG states, the data position. `save_model` outside checkpoints still
    writes the adapter trimmed to the final pattern.
    """

    untrimmed_save = False
    averages_micro_batches = False  # IVONTrainer's step averages them: a token loss is not summed over them
    draws_ivon_noise = False  # IVONTrainer draws IVON's noise from a stream of its own, which checkpoints keep

    def add_rank_allocation(self) -> None:
        callbacks = [cb for cb in self.callback_handler.callbacks if isinstance(cb, RankAllocationCallback)]
        if not callbacks:
            callbacks = [RankAllocationCallback()]
            self.add_callback(callbacks[0])
        for callback in callbacks:
            callback.untrimmed_checkpoints = True

    @contextmanager
    def untrimmed(self):
        """peft trims the saved adapter to `rank_pattern`: without one, it saves every triplet."""
        pattern = rank_pattern(self.tuner)
        set_rank_pattern(self.tuner, None)
        try:
            yield
        finally:
            set_rank_pattern(self.tuner, pattern)

    @property
    def tuner(self):
        return adalora_tuner(self.model)

    def penalty_divisor(self, model, num_items_in_batch) -> float:
        """How many times the Trainer counts each forward's orthogonality penalty in a training step.

        peft adds the penalty to every forward's loss. A causal LM's token loss (it divides by
        `num_items_in_batch`) is normalised over the step: the Trainer
        sums it over the micro-batches undivided (`AdaLoraTrainer` then counts the penalty once per
        micro-batch; `IVONTrainer` averages its micro-batches' gradients: once), and multiplies it by the
        process count under `average_tokens_across_devices`, which DDP's mean undoes for the NLL and not
        for the penalty, the same in every process. A classifier's mean loss gets the same factors in the
        Trainer as its penalty (the Trainer reads any `**kwargs` forward as taking `num_items_in_batch`),
        so there the two keep their proportion and nothing is divided; evaluation neither. (With
        `compute_loss_func` or label smoothing the Trainer takes the labels from the forward, which then
        returns no loss, and peft adds no penalty at all.)"""
        if not model.training or num_items_in_batch is None or not self.model_accepts_loss_kwargs:
            return 1.0
        if not causal_lm_token_loss(self.accelerator.unwrap_model(model)):
            return 1.0
        divisor = 1.0
        scaled_for_ga = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled_for_ga is not False and not self.averages_micro_batches:
            divisor *= getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        if self.args.average_tokens_across_devices:
            world = self.accelerator.num_processes // self.get_tp_size()
            divisor *= world if self.args.n_gpu <= 1 else self.args.n_gpu
        return divisor

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss, with the orthogonality penalty weighted so that it counts once a step."""
        divisor = self.penalty_divisor(model, num_items_in_batch)
        config = adalora_settings(self.tuner)
        weight = config.orth_reg_weight
        config.orth_reg_weight = weight / divisor
        try:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        finally:
            config.orth_reg_weight = weight

    def _save_checkpoint(self, model, trial):
        self.untrimmed_save = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.untrimmed_save = False
        if self.args.save_only_model:  # no optimizer state then, but load_best_model_at_end needs the pattern
            run_dir = self._get_output_dir(trial=trial)
            self._save_adalora_state(os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"))

    def _save(self, output_dir=None, state_dict=None):
        if not self.untrimmed_save:
            return super()._save(output_dir, state_dict)
        with self.untrimmed():
            return super()._save(output_dir, state_dict)

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        self._save_adalora_state(output_dir)

    def _save_adalora_state(self, output_dir):
        allocator = allocator_state(self.tuner)  # every process: of a model FSDP sharded, the EMAs are gathered
        if self.args.should_save and os.path.isdir(output_dir):
            optimizer = unwrap_optimizer(self.optimizer)
            noise = getattr(self, "_ivon_noise", None)  # IVONTrainer's, once it has stepped
            torch.save({"allocator": allocator,
                        "ivon_current_step": getattr(optimizer, "current_step", None),
                        "ivon_noise": noise.state if noise is not None else None},
                       os.path.join(output_dir, ADALORA_STATE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        state = read_adalora_state(checkpoint)
        load_allocator_state(self.tuner, state["allocator"])
        if state["ivon_current_step"] is not None:
            optimizer = unwrap_optimizer(self.optimizer)
            optimizer.current_step = state["ivon_current_step"]
            place_ivon_state(optimizer)  # one process: the Trainer loaded the optimizer's state onto the CPU
        if state.get("ivon_noise") is not None and self.draws_ivon_noise:
            self.ivon_noise.load_state(state["ivon_noise"])

    def _load_best_model(self):
        with self.untrimmed():  # peft would resize the live layers to the in-memory pattern before loading
            super()._load_best_model()
        # the best checkpoint's pattern: what its zero lambdas are, and what save_model trims to
        state = read_adalora_state(self.state.best_model_checkpoint)
        set_rank_pattern(self.tuner, state["allocator"]["rank_pattern"])
        remask(self.tuner)


def read_adalora_state(checkpoint: str) -> dict:
    path = os.path.join(checkpoint, ADALORA_STATE)
    if not os.path.isfile(path):
        raise ValueError(f"{checkpoint} has no {ADALORA_STATE}: it was not written by AdaLoraTrainer or IVONTrainer, "
                         "and its adapter may be trimmed")
    return torch.load(path, map_location="cpu", weights_only=True)


def unwrap_optimizer(optimizer):
    """The optimizer inside accelerate's `AcceleratedOptimizer` wrappers."""
    while hasattr(optimizer, "optimizer") and not isinstance(optimizer, (ivon.IVON, torch.optim.AdamW)):
        optimizer = optimizer.optimizer
    return optimizer
