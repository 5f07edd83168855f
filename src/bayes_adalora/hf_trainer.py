"""Training with a stock `transformers.Trainer`: AdaLoRA's rank allocation as a callback, IVON's sampled step.

- `RankAllocationCallback` drives peft's AdaLoRA from the Trainer's steps, with any optimizer
  (plain `adalora` with AdamW too): `total_step` from the Trainer's `max_steps`, and
  `update_and_allocate(step)` after every optimizer step, so the final rank pattern lands in
  `peft_config.rank_pattern` and `save_pretrained` trims the adapter to it.
- `IVONTrainer` trains `bayes-adalora` or `adalora-ivon` with IVON: one optimizer step averages the
  gradients of `train_mc_samples` posterior samples per micro-batch; it adds the callback itself.
- `make_trainer` builds the adapter model (`build.build_trainable_model`) and the right Trainer for
  a `TrainConfig`.

What comes from where: the schedule (learning rate, steps, batch size, warm-up, scheduler type) is
the `TrainingArguments`'; the method, adapter and IVON settings are the `TrainConfig`'s.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import ivon
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from .adapters import adalora_tuner
from .allocator import PosteriorRankAllocator, install_allocator
from .build import build_trainable_model, make_optimizer, use_fast_path
from .config import TrainConfig
from .kinds import task_kind
from .methods import IVON_METHODS
from .steps import IVONStep
from .tasks import get_task

# Below this, a learning rate is on AdamW's scale: IVON's step is lr * clip((m + wd mu) / (h + wd)).
IVON_LR_WARN_BELOW = 1e-2


def check_adalora_phases(tinit: int, tfinal: int, total_steps: int) -> None:
    """The budget falls between steps tinit and total_steps - tfinal: that interval must not be empty."""
    if not tinit < total_steps - tfinal:
        raise ValueError(
            f"AdaLoRA's tinit ({tinit}) and tfinal ({tfinal}) leave no steps for the rank budget to fall "
            f"in the Trainer's {total_steps} steps: lower them or train longer"
        )


def trainer_max_steps(args: TrainingArguments, n_examples: int | None) -> int:
    """The number of optimizer steps `Trainer.train()` will run, by the Trainer's own arithmetic.

    steps = ceil(epochs * max(1, ceil(batches / accumulation))), with batches = ceil(n / batch) per
    process (n // batch with `dataloader_drop_last`); `max_steps` wins when positive.
    """
    if args.max_steps > 0:
        return args.max_steps
    if n_examples is None:
        raise ValueError("the training set has no length: set TrainingArguments.max_steps")
    per_process = math.ceil(n_examples / args.world_size)
    batches = (
        per_process // args.train_batch_size
        if args.dataloader_drop_last
        else math.ceil(per_process / args.train_batch_size)
    )
    per_epoch = max(1, math.ceil(batches / args.gradient_accumulation_steps))
    return math.ceil(args.num_train_epochs * per_epoch)


class RankAllocationCallback(TrainerCallback):
    """AdaLoRA's rank allocation, driven by the Trainer (what peft otherwise leaves to a hand-written loop).

    - train begin: `total_step` := the Trainer's `max_steps` (peft's budget schedule reads it);
      a ValueError if `tinit` and `tfinal` leave no room for the budget to fall, or if
      `load_best_model_at_end` is set (see below), rather than a failure after the last step.
    - after every optimizer step: `update_and_allocate(step)` with step = 1, 2, ..., max_steps. The hook
      is `on_optimizer_step`, which runs after `optimizer.step()` and before `zero_grad()`: the
      gradients that peft's sensitivity (`adalora`, `adalora-ivon`) reads are still there
      (`on_step_end` runs after `zero_grad()`).
    - train end: if training stopped before the final allocation (e.g. early stopping), masked
      triplets may have regrown since the last mask; the last rank pattern is re-applied so that the
      model in memory equals what `save_pretrained` writes.

    Checkpoints hold the adapter trimmed to the rank pattern of their step, which peft cannot load
    back into the untrimmed model being trained: `resume_from_checkpoint` fails with a size mismatch,
    and so would `load_best_model_at_end`, whatever the optimizer.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.load_best_model_at_end:
            raise ValueError(
                "load_best_model_at_end cannot work with AdaLoRA: checkpoints hold the adapter trimmed to "
                "their rank pattern, which does not load back into the model being trained"
            )
        tuner = adalora_tuner(model)
        config = tuner.peft_config[tuner.trainable_adapter_name]
        check_adalora_phases(config.tinit, config.tfinal, state.max_steps)
        config.total_step = state.max_steps
        tuner.rankallocator.set_total_step(state.max_steps)  # the same config object, unless replaced

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # the Trainer counts this step in global_step only after the hook
        adalora_tuner(model).update_and_allocate(state.global_step + 1)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        tuner = adalora_tuner(model)
        rank_pattern = tuner.peft_config[tuner.trainable_adapter_name].rank_pattern
        if rank_pattern:
            tuner.rankallocator.mask_using_rank_pattern(tuner.model, rank_pattern)


class IVONTrainer(Trainer):
    """A `transformers.Trainer` that trains a peft AdaLoRA model with IVON (`bayes-adalora`, `adalora-ivon`).

    Takes the Trainer's arguments plus `config`, a `TrainConfig` (default: `bayes-adalora`), of
    which it reads `method`, `criterion`, the `ivon_*` settings and `train_mc_samples`. IVON's
    learning rate is `args.learning_rate` and follows the Trainer's scheduler; its effective sample
    size is `config.ivon_ess`, else the training-set size.

    One optimizer step: for each micro-batch and each of `train_mc_samples` posterior samples,
    the loss (the micro-batch mean) is back-propagated at the sampled weights; IVON averages those
    gradients, so with equal micro-batches it steps on the batch's mean gradient whatever
    `gradient_accumulation_steps` is. Evaluation and saving use the posterior mean.

    Gradient clipping does not apply (IVON clips its own update, `ivon_clip_radius`): a nonzero
    `max_grad_norm` is set to 0 with a warning. Refused: fp16 (its loss scaling changes the gradients
    IVON reads; use bf16 or fp32) and more than one process or device (IVON's noise and Hessian
    would differ between processes).
    """

    def __init__(self, *args, config: TrainConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_config = config if config is not None else TrainConfig()
        method = self.train_config.method
        if method not in IVON_METHODS:
            raise ValueError(f"IVONTrainer trains {' or '.join(IVON_METHODS)}, not {method!r}")
        adalora_tuner(self.model)
        if self.args.fp16:
            raise ValueError(
                "IVONTrainer cannot use fp16: its loss scaling changes the gradients IVON reads; use bf16 or fp32"
            )
        if self.args.world_size > 1 or self.args.n_gpu > 1 or self.args.deepspeed:
            raise ValueError(
                "IVONTrainer runs in one process on one device: IVON's samples would differ between processes"
            )
        if self.args.max_grad_norm:
            warnings.warn(
                "IVON does not use gradient clipping (it clips its own update): "
                f"max_grad_norm {self.args.max_grad_norm} set to 0",
                stacklevel=2,
            )
        self.args.max_grad_norm = 0.0  # also for None, which the Trainer's loop cannot compare
        if self.args.learning_rate < IVON_LR_WARN_BELOW:
            warnings.warn(
                f"learning_rate {self.args.learning_rate} is on AdamW's scale; IVON's step is "
                "lr * clip((m + wd mu) / (h + wd)), and bayes-adalora's default lr is 3.0",
                stacklevel=2,
            )
        if not any(isinstance(cb, RankAllocationCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(RankAllocationCallback())

    @property
    def ivon_optimizer(self):
        """The IVON instance behind the Trainer's optimizer (which accelerate wraps in `AcceleratedOptimizer`)."""
        optimizer = self.optimizer
        while optimizer is not None and not isinstance(optimizer, ivon.IVON):
            optimizer = getattr(optimizer, "optimizer", None)
        if optimizer is None:
            raise ValueError(f"IVONTrainer needs an ivon.IVON optimizer, got {type(self.optimizer).__name__}")
        return optimizer

    def ivon_ess(self) -> float:
        if self.train_config.ivon_ess is not None:
            return float(self.train_config.ivon_ess)
        try:
            return float(len(self.train_dataset))
        except TypeError as exc:
            raise ValueError("the training set has no length: set TrainConfig.ivon_ess") from exc

    def create_optimizer(self, model=None):
        """IVON over the trainable parameters (unless one was passed in); for bayes-adalora, the posterior
        allocator; the fast path where the config asks for it (`build.use_fast_path`)."""
        if self.optimizer is None:
            settings = dataclasses.replace(self.train_config, lr=self.args.learning_rate)
            self.optimizer = make_optimizer(model if model is not None else self.model, settings, self.ivon_ess())
        optimizer = self.ivon_optimizer
        tuner = adalora_tuner(self.model)
        if self.train_config.method_spec.allocator == "posterior":
            allocator = tuner.rankallocator
            if not (isinstance(allocator, PosteriorRankAllocator) and allocator.optimizer is optimizer):
                install_allocator(self.model, self.train_config.method, optimizer, self.train_config.criterion)
        use_fast_path(self.model, self.train_config, optimizer)  # a model or an IVON passed in: fast path too
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward and backward at `train_mc_samples` posterior samples; IVON collects each sample's gradient.

        Returns the mean loss divided by the number of micro-batches of this step, as the Trainer
        expects for logging. Each sample's loss is its micro-batch mean (`num_items_in_batch` is not
        used): IVON averages over samples instead of summing accumulated gradients.
        """
        model.train()
        inputs = self._prepare_inputs(inputs)

        def forward_backward():
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, dict(inputs))  # a copy: compute_loss may pop the labels
            self.accelerator.backward(loss)
            return loss

        step = IVONStep(self.ivon_optimizer, self.train_config.train_mc_samples)
        return step.gradients(forward_backward) / self.current_gradient_accumulation_steps


def make_trainer(model, train_dataset, eval_dataset, config: TrainConfig, training_args: TrainingArguments,
                 **trainer_kwargs) -> Trainer:
    """A Trainer for `config.method`, with the adapter model built as the CLI builds it.

    `model`: a name or path (loaded for `config.task`, a causal LM for causal-lm and multiple-choice; the
    tokenizer becomes the `processing_class` and the task's padding collator the `data_collator` unless
    given; modules the checkpoint lacks are trained in full and saved), or a model object (for sequence
    classification only its head is then trained in full). The adapter's default `tinit`, `tfinal` and
    `delta_t` scale with the Trainer's step count. Returns an `IVONTrainer` for IVON methods, else a
    `transformers.Trainer` (AdamW from `training_args`), with `RankAllocationCallback` for every AdaLoRA
    method.
    """
    set_seed(training_args.seed)  # the new head and the adapter start from the run's seed
    if isinstance(model, str):
        kind = task_kind(get_task(config.task))  # a classifier, or a causal LM for the decoder-LM tasks
        tokenizer, model, fresh = kind.load_model(model, config, training_args.device)
        trainer_kwargs.setdefault("processing_class", tokenizer)
        trainer_kwargs.setdefault("data_collator", kind.collator(tokenizer))
    else:
        fresh = set()
    n_examples = len(train_dataset) if hasattr(train_dataset, "__len__") else None
    model = build_trainable_model(model, config, trainer_max_steps(training_args, n_examples), fresh)
    common = dict(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset)
    if config.uses_ivon:
        return IVONTrainer(**common, config=config, **trainer_kwargs)
    if config.uses_adalora:
        trainer_kwargs["callbacks"] = [*(trainer_kwargs.get("callbacks") or []), RankAllocationCallback()]
    return Trainer(**common, **trainer_kwargs)
