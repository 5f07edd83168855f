"""`RankAllocationCallback`: peft's AdaLoRA rank allocation driven by a `transformers.Trainer`'s steps, with
any optimizer."""

from __future__ import annotations

from transformers import TrainerCallback

from .adapters import adalora_settings, adalora_tuner, rank_allocator, remask
from .allocator import PosteriorRankAllocator
from .config import check_phases


class RankAllocationCallback(TrainerCallback):
    """AdaLoRA's rank allocation, driven by the Trainer (what peft otherwise leaves to a hand-written loop).

    - train begin: `total_step` := the Trainer's `max_steps` (peft's budget schedule reads it);
      a ValueError if `tinit` and `tfinal` leave no room for the budget to fall, or if
      `load_best_model_at_end` is set under a Trainer whose checkpoints are trimmed (see below),
      rather than a failure after the last step.
    - after every optimizer step: `update_and_allocate(step)` with step = 1, 2, ..., max_steps. The hook
      is `on_optimizer_step`, which runs after `optimizer.step()` and before `zero_grad()`: the
      gradients that peft's sensitivity (`adalora`, `adalora-ivon`) reads are still there
      (`on_step_end` runs after `zero_grad()`). A step fp16's loss scaler skipped (gradients inf or
      NaN) masks on schedule but leaves the sensitivity EMAs as they were.
    - train end: if training stopped before the final allocation (e.g. early stopping), masked
      triplets may have regrown since the last mask; the last rank pattern is re-applied so that the
      model in memory equals what `save_pretrained` writes.

    Under a stock `Trainer`, checkpoints hold the adapter trimmed to the rank pattern of their step,
    which peft cannot load back into the untrimmed model being trained: `resume_from_checkpoint` and
    `load_best_model_at_end` need `AdaLoraTrainer` or `IVONTrainer`, which set `untrimmed_checkpoints`.
    """

    def __init__(self, untrimmed_checkpoints: bool = False):
        self.untrimmed_checkpoints = untrimmed_checkpoints

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.load_best_model_at_end and not self.untrimmed_checkpoints:
            raise ValueError(
                "load_best_model_at_end cannot work with AdaLoRA under a stock Trainer: its checkpoints hold the "
                "adapter trimmed to their rank pattern; use bayes_adalora's AdaLoraTrainer or IVONTrainer"
            )
        tuner = adalora_tuner(model)
        config = adalora_settings(tuner)
        check_phases(config.tinit, config.tfinal, state.max_steps, flags=False)
        config.total_step = state.max_steps
        rank_allocator(tuner).set_total_step(state.max_steps)  # the same config object, unless replaced

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        # the Trainer counts this step in global_step only after the hook
        tuner = adalora_tuner(model)
        if not getattr(optimizer, "step_was_skipped", False):
            tuner.update_and_allocate(state.global_step + 1)
            return
        # fp16's loss scaler skipped the step: its gradients are inf or NaN, which would stay in the
        # sensitivity EMAs for good (NaN scores are never pruned). The schedule still masks (or fixes the
        # final pattern) at this step, from the EMAs as they were.
        allocator = rank_allocator(tuner)
        if not isinstance(allocator, PosteriorRankAllocator) and not allocator.exp_avg_ipt:
            return  # no step has been read yet: there is nothing to mask from (peft's masking needs the EMAs)
        allocator.update_ipt = lambda model: None  # shadows the class's method for this call only
        try:
            tuner.update_and_allocate(state.global_step + 1)
        finally:
            del allocator.update_ipt

    def on_train_end(self, args, state, control, model=None, **kwargs):
        remask(adalora_tuner(model))
