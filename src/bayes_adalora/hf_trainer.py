"""Training with a stock `transformers.Trainer`: AdaLoRA's rank allocation as a callback, IVON's sampled step,
resumable checkpoints, and metrics with calibration.

- `IVONArguments`: what the Trainer path needs beyond `TrainingArguments` (method, criterion, AdaLoRA's
  budget, IVON's settings, train MC samples), checked on creation with `TrainConfig`'s field bounds.
- `RankAllocationCallback` drives peft's AdaLoRA from the Trainer's steps, with any optimizer
  (plain `adalora` with AdamW too): `total_step` from the Trainer's `max_steps`, and
  `update_and_allocate(step)` after every optimizer step, so the final rank pattern lands in
  `peft_config.rank_pattern` and `save_pretrained` trims the adapter to it.
- `AdaLoraTrainer` (AdamW) and `IVONTrainer` (`bayes-adalora`, `adalora-ivon`: one optimizer step
  averages the gradients of `train_mc_samples` posterior samples per micro-batch) add the callback and
  write checkpoints that resume: the untrimmed adapter, the allocator state and IVON's step count.
- `make_trainer` builds the adapter model (`build.build_trainable_model`) and the right Trainer for
  a `TrainConfig`; `compute_metrics` adds ece, nll, brier and aurc to a Trainer's evaluation
  (`reduce_lm_logits` + `compute_lm_metrics` for a causal LM without gathering its logits).

What comes from where: the schedule (learning rate, steps, batch size, warm-up, scheduler type) is
the `TrainingArguments`'; the method, adapter and IVON settings are the `IVONArguments`' (or a `TrainConfig`'s).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import ivon
import numpy as np
import torch
from peft import AdaLoraConfig
from scipy.special import log_softmax
from transformers import EvalPrediction, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .adapters import adalora_tuner
from .allocator import PosteriorRankAllocator, install_allocator
from .build import build_trainable_model, make_optimizer, use_fast_path
from .checkpoint import allocator_state, load_allocator_state, place_ivon_state
from .config import TrainConfig, adalora_phases, check_field, coerce_field
from .evaluation import Predictive, calibration_from_statistics, calibration_metrics
from .ivon_settings import NumberOrWord, resolve_ess
from .kinds import task_kind
from .lm_metrics import IGNORE_INDEX
from .methods import IVON_METHODS, METHODS, get_method
from .models import causal_lm_token_loss
from .steps import IVONStep, NoiseStream
from .tasks import get_task

# Below this, a learning rate is on AdamW's scale: IVON's step is lr * clip((m + wd mu) / (h + wd)).
IVON_LR_WARN_BELOW = 1e-2
ADALORA_STATE = "adalora_state.pt"  # in a Trainer checkpoint: the allocator state and IVON's step count
ADALORA_METHODS = tuple(name for name, m in METHODS.items() if m.uses_adalora)


def like_train_config(name: str):
    """A field with `TrainConfig`'s default, help, bounds and choices for `name` (one place for each fact)."""
    source = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    return dataclasses.field(default=source.default, metadata=source.metadata)


@dataclass
class IVONArguments:
    """The Trainer path's settings beyond `TrainingArguments`: the method, its AdaLoRA budget and IVON.

    Every field has `TrainConfig`'s help, bounds and default, and is checked on creation as there (a
    `UserError` naming the setting); the learning rate, steps and batch size are the `TrainingArguments'`.
    `init_r`, `target_r`, `tinit`, `tfinal`, `delta_t`, `orth_reg` are read by `adalora_config`, when the
    arguments build the adapter; a model built elsewhere keeps its own `AdaLoraConfig`.
    """

    method: str = like_train_config("method")
    criterion: str = like_train_config("criterion")
    init_r: int = like_train_config("init_r")
    target_r: int = like_train_config("target_r")
    tinit: int | None = like_train_config("tinit")
    tfinal: int | None = like_train_config("tfinal")
    delta_t: int | None = like_train_config("delta_t")
    orth_reg: float = like_train_config("orth_reg")
    ivon_ess: NumberOrWord | None = like_train_config("ivon_ess")  # noqa: RUF009 (a float, "auto" or "train-size")
    ivon_hess_init: float = like_train_config("ivon_hess_init")
    ivon_beta1: float = like_train_config("ivon_beta1")
    ivon_beta2: NumberOrWord = like_train_config("ivon_beta2")  # noqa: RUF009 (a float or "auto")
    ivon_weight_decay: float = like_train_config("ivon_weight_decay")
    ivon_clip_radius: float = like_train_config("ivon_clip_radius")
    train_mc_samples: int = like_train_config("train_mc_samples")
    fast_path: bool = like_train_config("fast_path")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            coerce_field(self, f)
            check_field(f, getattr(self, f.name), IVONArguments)
        if self.method not in ADALORA_METHODS:
            raise ValueError(f"the Trainer path trains an AdaLoRA method ({', '.join(ADALORA_METHODS)}), "
                             f"not {self.method!r}")
        self.train_config()  # the checks across fields (target_r below init_r, ...) are TrainConfig's

    @classmethod
    def from_train_config(cls, config: TrainConfig) -> IVONArguments:
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    def train_config(self, **overrides) -> TrainConfig:
        """The same settings as a `TrainConfig` (for `build.make_optimizer` and `build.build_trainable_model`)."""
        return TrainConfig(**{**dataclasses.asdict(self), **overrides})

    @property
    def uses_ivon(self) -> bool:
        return get_method(self.method).uses_ivon

    def adalora_config(self, total_step: int, target_modules, **peft_kwargs) -> AdaLoraConfig:
        """peft's `AdaLoraConfig` with this budget; `tinit`, `tfinal`, `delta_t` not given scale with
        `total_step` as on the command line. `peft_kwargs` go to peft (`task_type`, `lora_alpha`, ...)."""
        tinit, tfinal, delta_t = adalora_phases(self.train_config(), total_step)
        return AdaLoraConfig(init_r=self.init_r, target_r=self.target_r, tinit=tinit, tfinal=tfinal, deltaT=delta_t,
                             orth_reg_weight=self.orth_reg, total_step=total_step, target_modules=target_modules,
                             **peft_kwargs)


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


# ----------------------------------------------------------------------------- metrics


def compute_metrics(eval_prediction) -> dict[str, float]:
    """A Trainer's `compute_metrics` for any classifier: accuracy, ece, nll, brier, aurc and
    accuracy_at_coverage_{0.5,0.8,1.0} (`evaluation.calibration_metrics`, as in results.json).

    Logits (N, C) with labels (N,) (sequence classification, multiple choice), or (N, T, V) with
    labels (N, T) for a causal LM: the logits at position t predict the label at t + 1, and labels
    -100 (padding, the prompt) are left out, as in the model's own loss. A causal LM's (N, T, V)
    logits are reduced a few rows at a time; to keep the Trainer from gathering them at all, use
    `reduce_lm_logits` with `compute_lm_metrics` instead.
    """
    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    labels = np.asarray(labels)
    if np.ndim(logits) == 3:
        rows = max(1, LM_CHUNK_ENTRIES // max(1, logits.shape[1] * logits.shape[2]))
        statistics = [reduce_lm_logits(torch.as_tensor(np.asarray(logits[i:i + rows])),
                                       torch.as_tensor(labels[i:i + rows])).numpy()
                      for i in range(0, len(logits), rows)]
        return compute_lm_metrics(EvalPrediction(np.concatenate(statistics), labels))
    logits = np.asarray(logits, dtype=np.float64)
    scored = labels != IGNORE_INDEX
    check_scored(scored)
    logits, labels = logits[scored], labels[scored].astype(np.int64)
    predictive = Predictive(logits.argmax(axis=-1), log_softmax(logits, axis=-1))
    return flat_metrics(float((predictive.predictions == labels).mean()), calibration_metrics(predictive, labels))


LM_CHUNK_ENTRIES = 2**24  # logits reduced at a time by compute_metrics (64 MiB of float32)
LM_STATISTICS = ("predicted", "log_confidence", "label_log_prob", "squared_probability")


def reduce_lm_logits(logits, labels) -> torch.Tensor:
    """A Trainer's `preprocess_logits_for_metrics` for a causal LM: (N, T, V) logits to (N, T - 1, 4)
    next-token statistics (`LM_STATISTICS`: the predicted token, log of its probability, log p of the
    label, sum of squared probabilities), on the model's device, so that the Trainer gathers 4 numbers
    a token instead of V. Position t describes the prediction of label t + 1. Use with `compute_lm_metrics`.
    """
    logits = logits[0] if isinstance(logits, tuple) else logits
    if labels is None:
        raise ValueError("reduce_lm_logits needs the evaluation batches' labels (a `labels` column)")
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:].to(log_probs.device)
    log_confidence, predicted = log_probs.max(dim=-1)
    label_log_prob = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    squared = torch.exp(2 * log_probs).sum(dim=-1)
    return torch.stack([predicted.float(), log_confidence, label_log_prob, squared], dim=-1)


def compute_lm_metrics(eval_prediction) -> dict[str, float]:
    """`compute_metrics` for a causal LM evaluated with `preprocess_logits_for_metrics=reduce_lm_logits`:
    the same numbers as `compute_metrics` on its full logits, over the tokens whose label is not -100."""
    statistics, labels = np.asarray(eval_prediction.predictions), np.asarray(eval_prediction.label_ids)
    if statistics.ndim != 3 or statistics.shape[-1] != len(LM_STATISTICS):
        raise ValueError(f"compute_lm_metrics expects reduce_lm_logits' (N, T - 1, {len(LM_STATISTICS)}) statistics "
                         f"(pass preprocess_logits_for_metrics=reduce_lm_logits), got shape {statistics.shape}")
    targets = labels[:, 1:]
    width = min(statistics.shape[1], targets.shape[1])  # the Trainer pads both to its longest batch
    statistics, targets = statistics[:, :width], targets[:, :width]
    scored = targets != IGNORE_INDEX
    check_scored(scored)
    predicted, log_confidence, label_log_prob, squared = np.moveaxis(statistics[scored].astype(np.float64), -1, 0)
    correct = predicted.astype(np.int64) == targets[scored]
    metrics = calibration_from_statistics(np.exp(log_confidence), correct, label_log_prob, squared)
    return flat_metrics(float(correct.mean()), metrics)


def check_scored(scored: np.ndarray) -> None:
    if not scored.any():
        raise ValueError("the evaluation set has no scored label (every label is -100): nothing to compute "
                         "metrics on")


def flat_metrics(accuracy: float, metrics: dict) -> dict[str, float]:
    """accuracy and the calibration metrics as one flat dict: the Trainer's loggers take numbers only."""
    at_coverage = metrics.pop("accuracy_at_coverage")
    return {"accuracy": accuracy, **metrics, **{f"accuracy_at_coverage_{c}": v for c, v in at_coverage.items()}}


# ----------------------------------------------------------------------------- rank allocation


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
        config = tuner.peft_config[tuner.trainable_adapter_name]
        check_adalora_phases(config.tinit, config.tfinal, state.max_steps)
        config.total_step = state.max_steps
        tuner.rankallocator.set_total_step(state.max_steps)  # the same config object, unless replaced

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        # the Trainer counts this step in global_step only after the hook
        tuner = adalora_tuner(model)
        if not getattr(optimizer, "step_was_skipped", False):
            tuner.update_and_allocate(state.global_step + 1)
            return
        # fp16's loss scaler skipped the step: its gradients are inf or NaN, which would stay in the
        # sensitivity EMAs for good (NaN scores are never pruned). The schedule still masks (or fixes the
        # final pattern) at this step, from the EMAs as they were.
        allocator = tuner.rankallocator
        if not isinstance(allocator, PosteriorRankAllocator) and not allocator.exp_avg_ipt:
            return  # no step has been read yet: there is nothing to mask from (peft's masking needs the EMAs)
        allocator.update_ipt = lambda model: None  # shadows the class's method for this call only
        try:
            tuner.update_and_allocate(state.global_step + 1)
        finally:
            del allocator.update_ipt

    def on_train_end(self, args, state, control, model=None, **kwargs):
        remask(adalora_tuner(model))


def remask(tuner) -> None:
    """Apply the tuner's rank pattern to its lambdas (a no-op before the first mask)."""
    rank_pattern = tuner.peft_config[tuner.trainable_adapter_name].rank_pattern
    if rank_pattern:
        tuner.rankallocator.mask_using_rank_pattern(tuner.model, rank_pattern)


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
        config = self.tuner.peft_config[self.tuner.trainable_adapter_name]
        pattern, config.rank_pattern = config.rank_pattern, None
        try:
            yield
        finally:
            config.rank_pattern = pattern

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
        config = self.tuner.peft_config[self.tuner.trainable_adapter_name]
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
        if self.args.should_save and os.path.isdir(output_dir):
            optimizer = unwrap_optimizer(self.optimizer)
            noise = getattr(self, "_ivon_noise", None)  # IVONTrainer's, once it has stepped
            torch.save({"allocator": allocator_state(self.tuner),
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
        self.tuner.peft_config[self.tuner.trainable_adapter_name].rank_pattern = state["allocator"]["rank_pattern"]
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


class AdaLoraTrainer(AdaLoraCheckpoints, Trainer):
    """A stock `Trainer` (its optimizer, AdamW by default) for a peft AdaLoRA model, with
    `RankAllocationCallback` and checkpoints that resume (`AdaLoraCheckpoints`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        adalora_tuner(self.model)
        self.add_rank_allocation()


class IVONTrainer(AdaLoraCheckpoints, Trainer):
    """A `transformers.Trainer` that trains a peft AdaLoRA model with IVON (`bayes-adalora`, `adalora-ivon`).

    Takes the Trainer's arguments plus `ivon_args`, an `IVONArguments` (default: `bayes-adalora`), or
    `config`, a `TrainConfig` whose same fields are read. The model is any peft AdaLoRA model, of any
    task type. IVON's learning rate is `args.learning_rate` and follows the Trainer's scheduler; its
    effective sample size is `ivon_ess` (with `auto`, the default, the training-set size or 10 per trainable
    parameter where larger; with `train-size`, the training-set size).

    One optimizer step: for each micro-batch and each of `train_mc_samples` posterior samples,
    the loss (the micro-batch mean) is back-propagated at the sampled weights; IVON averages those
    gradients, so with equal micro-batches it steps on the batch's mean gradient whatever
    `gradient_accumulation_steps` is. Evaluation and saving use the posterior mean.

    Several processes (`torchrun`, DDP): every process samples the same noise (from `ivon_noise`, a
    stream of its own seeded from `args.seed`, which dropout on unequally padded micro-batches cannot
    shift), DDP averages the gradients and IVON runs with `sync=True`, so all hold the same posterior and
    mask the same triplets. Gradient clipping does not apply (IVON clips its own update,
    `ivon_clip_radius`): a nonzero `max_grad_norm` is set to 0 with a warning. Refused: fp16 (its loss
    scaling changes the gradients IVON reads; use bf16 or fp32), DeepSpeed and several devices in one
    process (DataParallel).
    """

    averages_micro_batches = True
    draws_ivon_noise = True

    def __init__(self, *args, ivon_args: IVONArguments | None = None, config: TrainConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if ivon_args is not None and config is not None:
            raise ValueError("give IVONTrainer ivon_args or config, not both")
        if config is not None:
            ivon_args = IVONArguments.from_train_config(config)
        self.ivon_args = ivon_args if ivon_args is not None else IVONArguments()
        method = self.ivon_args.method
        if method not in IVON_METHODS:
            raise ValueError(f"IVONTrainer trains {' or '.join(IVON_METHODS)}, not {method!r}")
        adalora_tuner(self.model)
        if self.args.fp16:
            raise ValueError(
                "IVONTrainer cannot use fp16: its loss scaling changes the gradients IVON reads; use bf16 or fp32"
            )
        if self.args.n_gpu > 1 or self.args.deepspeed:
            raise ValueError("IVONTrainer runs one device per process (torchrun), not DataParallel or DeepSpeed")
        self.args = copy.copy(self.args)  # the caller's arguments keep their max_grad_norm (for an AdamW baseline)
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
        self.add_rank_allocation()

    @property
    def ivon_optimizer(self):
        """The IVON instance behind the Trainer's optimizer (which accelerate wraps in `AcceleratedOptimizer`)."""
        optimizer = unwrap_optimizer(self.optimizer)
        if not isinstance(optimizer, ivon.IVON):
            raise ValueError(f"IVONTrainer needs an ivon.IVON optimizer, got {type(optimizer).__name__}")
        return optimizer

    def ivon_ess(self, model: torch.nn.Module | None = None) -> float:
        """IVON's effective sample size for `model` (default: the Trainer's): `ivon_args.ivon_ess` resolved
        (`ivon_settings.resolve_ess`) with the training set's size and the model's trainable parameters."""
        setting = self.ivon_args.ivon_ess
        if isinstance(setting, (int, float)):
            return float(setting)
        try:
            examples = len(self.train_dataset)
        except TypeError as exc:
            raise ValueError("the training set has no length: set IVONArguments.ivon_ess to a number") from exc
        trainable = sum(p.numel() for p in (model or self.model).parameters() if p.requires_grad)
        return resolve_ess(setting, examples, trainable)

    @property
    def ivon_noise(self) -> NoiseStream:
        """IVON's noise stream (`steps.NoiseStream`), seeded from `args.seed`: the same in every process."""
        if getattr(self, "_ivon_noise", None) is None:
            device = next(p.device for g in self.ivon_optimizer.param_groups for p in g["params"] if p is not None)
            self._ivon_noise = NoiseStream(self.args.seed, device)
        return self._ivon_noise

    def run_steps(self) -> int:
        """The optimizer steps `train()` runs (what `--ivon-beta2 auto` follows)."""
        if self.state.max_steps:
            return self.state.max_steps
        dataset = self.train_dataset
        return trainer_max_steps(self.args, len(dataset) if hasattr(dataset, "__len__") else None)

    def create_optimizer(self, model=None):
        """IVON over the trainable parameters (unless one was passed in), with `sync=True` under several
        processes; for bayes-adalora, the posterior allocator; the fast path where the arguments ask for
        it (`build.use_fast_path`)."""
        settings = self.ivon_args.train_config(learning_rate=self.args.learning_rate)
        if self.optimizer is None:
            self._ivon_noise = None  # a new optimizer (a new train() or trial) draws from a new stream of args.seed
            model = model if model is not None else self.model
            self.optimizer = make_optimizer(model, settings, self.ivon_ess(model), sync=self.args.world_size > 1,
                                            total_steps=self.run_steps())
        optimizer = self.ivon_optimizer
        if self.args.world_size > 1 and optimizer.hess_approx == "price":  # ivon-opt cannot sync 'gradsq'
            optimizer.sync = True  # one passed in too: else accumulated micro-batches stay per process
        tuner = adalora_tuner(self.model)
        if get_method(self.ivon_args.method).reads_posterior:
            allocator = tuner.rankallocator
            if not (isinstance(allocator, PosteriorRankAllocator) and allocator.optimizer is optimizer):
                install_allocator(self.model, self.ivon_args.method, optimizer, self.ivon_args.criterion)
        use_fast_path(self.model, settings, optimizer)  # a model or an IVON passed in: fast path too
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward and backward at `train_mc_samples` posterior samples; IVON collects each sample's gradient.

        Returns the mean loss divided by the number of micro-batches of this step, as the Trainer
        expects for logging. IVON averages its gradients over the samples and the step's micro-batches
        (and over processes: DDP, `sync=True`), where the Trainer sums micro-batches. A loss that is a
        micro-batch mean (a classifier's) is back-propagated as it is. A causal LM's token loss is the
        summed token NLL / `num_items_in_batch`, which the Trainer counts over the step's micro-batches
        (and over the processes with `average_tokens_across_devices`, when `compute_loss` multiplies the
        loss by the process count): it gets that count / the micro-batch count, so IVON's average is the
        gradient of the step's per-token mean even when micro-batches or processes hold unequal numbers
        of tokens, and the AdaLoRA orthogonality penalty, added to each forward's loss, counts once
        (`penalty_divisor` undoes `average_tokens_across_devices`' multiplication by the process count).
        """
        model.train()
        inputs = self._prepare_inputs(inputs)
        micro_batches = self.current_gradient_accumulation_steps
        per_token = num_items_in_batch is not None and causal_lm_token_loss(self.accelerator.unwrap_model(model))
        items = num_items_in_batch / micro_batches if per_token else None

        def forward_backward():
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, dict(inputs), num_items_in_batch=items)  # a copy: may pop the labels
            self.accelerator.backward(loss)
            return loss

        step = IVONStep(self.ivon_optimizer, self.ivon_args.train_mc_samples, self.ivon_noise)
        return step.gradients(forward_backward) / micro_batches


def make_trainer(model, train_dataset, eval_dataset, config: TrainConfig, training_args: TrainingArguments,
                 **trainer_kwargs) -> Trainer:
    """A Trainer for `config.method`, with the adapter model built as the CLI builds it.

    `model`: a name or path (loaded for `config.task`, a causal LM for causal-lm and multiple-choice; the
    tokenizer becomes the `processing_class` and the task's padding collator the `data_collator` unless
    given; modules the checkpoint lacks are trained in full and saved), or a model object (for sequence
    classification only its head is then trained in full). The adapter's default `tinit`, `tfinal` and
    `delta_t` scale with the Trainer's step count. Returns an `IVONTrainer` for IVON methods, an
    `AdaLoraTrainer` (AdamW from `training_args`) for `adalora`, else a `transformers.Trainer`.
    """
    set_seed(training_args.seed)  # the new head and the adapter start from the run's seed
    if isinstance(model, (str, os.PathLike)):
        model = str(model)
        kind = task_kind(get_task(config.task))  # a classifier, or a causal LM for the decoder-LM tasks
        if kind.spec.labels == ():  # classification on the user's own data: the classes of config.train_file
            kind.read_data(config)
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
        return AdaLoraTrainer(**common, **trainer_kwargs)
    return Trainer(**common, **trainer_kwargs)
