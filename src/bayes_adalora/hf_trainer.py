"""Training with a stock `transformers.Trainer`: the Trainers for peft AdaLoRA models, and `make_trainer`.

- `AdaLoraTrainer` (AdamW) and `IVONTrainer` (`bayes-adalora`, `adalora-ivon`: one optimizer step
  averages the gradients of `train_mc_samples` posterior samples per micro-batch) add AdaLoRA's rank
  allocation (`trainer_callback.RankAllocationCallback`) and write checkpoints that resume
  (`trainer_checkpoints.AdaLoraCheckpoints`).
- `make_trainer` builds the adapter model (`build.build_trainable_model`) and the right Trainer for a
  `TrainConfig`.

What comes from where: the schedule (learning rate, steps, batch size, warm-up, scheduler type) is the
`TrainingArguments`'; the method, adapter and IVON settings are the `IVONArguments`' (`trainer_args`), or a
`TrainConfig`'s. The metric functions for the Trainer's evaluation are in `trainer_metrics`. Every name
of those modules that a training script uses is importable from here too.
"""

from __future__ import annotations

import copy
import os
import warnings

import ivon
import torch
from transformers import Trainer, TrainingArguments, set_seed

from .adapters import adalora_tuner, rank_allocator, remask
from .allocator import PosteriorRankAllocator, SensitivityRankAllocator, install_allocator
from .build import build_trainable_model, make_optimizer, use_fast_path
from .config import TrainConfig
from .errors import UserError
from .ivon_inplace import ShardedIVON
from .ivon_settings import resolve_ess
from .kinds import task_kind
from .methods import IVON_METHODS, get_method
from .models import causal_lm_token_loss
from .sharding import model_is_sharded, process_mesh, shard_model
from .steps import IVONStep, NoiseStream
from .tasks import get_task
from .trainer_args import ADALORA_METHODS, IVONArguments, trainer_max_steps
from .trainer_callback import RankAllocationCallback
from .trainer_checkpoints import ADALORA_STATE, AdaLoraCheckpoints, read_adalora_state, unwrap_optimizer
from .trainer_fsdp import ShardedModel
from .trainer_metrics import compute_lm_metrics, compute_metrics, reduce_lm_logits

__all__ = [
    "ADALORA_METHODS", "ADALORA_STATE", "AdaLoraCheckpoints", "AdaLoraTrainer", "IVONArguments", "IVONTrainer",
    "RankAllocationCallback", "ShardedTrainer", "compute_lm_metrics", "compute_metrics", "make_trainer",
    "read_adalora_state", "reduce_lm_logits", "remask", "trainer_max_steps", "unwrap_optimizer",
]

# Below this, a learning rate is on AdamW's scale: IVON's step is lr * clip((m + wd mu) / (h + wd)).
IVON_LR_WARN_BELOW = 1e-2


class AdaLoraTrainer(ShardedModel, AdaLoraCheckpoints, Trainer):
    """A stock `Trainer` (its optimizer, AdamW by default) for a peft AdaLoRA model, with
    `RankAllocationCallback` and checkpoints that resume (`AdaLoraCheckpoints`); the model may be FSDP sharded
    (`ShardedModel`: `make_trainer` with `config.fsdp`), the sensitivity then kept on each process's rows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        adalora_tuner(self.model)
        refuse_accelerate_fsdp(self.args)
        if model_is_sharded(self.model):  # peft's masking reads whole weights: the one that reads shards
            install_allocator(self.model, "adalora", None, None)
        self.add_rank_allocation()


def refuse_accelerate_fsdp(args: TrainingArguments) -> None:
    """accelerate's FSDP (`TrainingArguments(fsdp=...)`, or an `accelerate launch` with an FSDP configuration)
    would shard the model inside the Trainer, where this package's trainers set up on the whole one: refused, for
    `make_trainer`'s `config.fsdp`. DeepSpeed from the launcher likewise."""
    if args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        raise ValueError("accelerate's FSDP (TrainingArguments(fsdp=...) or an FSDP launch configuration) shards the "
                         "model inside the Trainer, after IVON, the rank allocation and the checkpoints were set up "
                         "on the whole one: leave it off and give make_trainer a config with fsdp='full_shard' "
                         "(torch's FSDP2 before the Trainer)")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true"):
        raise ValueError("this run was launched with DeepSpeed, which bayes-adalora's trainers do not train with: "
                         "launch without it, and give make_trainer a config with fsdp='full_shard' to shard the model")


class ShardedTrainer(ShardedModel, Trainer):
    """A stock `Trainer` for a model FSDP sharded before it (`make_trainer` with `config.fsdp`: lora, full)."""


class IVONTrainer(ShardedModel, AdaLoraCheckpoints, Trainer):
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

    Several processes (`torchrun`, DDP; or FSDP, the model sharded before the Trainer: `make_trainer` with
    `config.fsdp`, IVON then a `ShardedIVON` on each process's rows): every process samples the same noise
    (from `ivon_noise`, a stream of its own seeded from `args.seed`, which dropout on unequally padded
    micro-batches cannot shift), DDP averages the gradients and IVON runs with `sync=True`, so all hold the
    same posterior and mask the same triplets. Gradient clipping does not apply (IVON clips its own update,
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
        refuse_accelerate_fsdp(self.args)
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
        sharded = isinstance(optimizer, ShardedIVON)  # FSDP's reduce-scatter already averaged each shard's gradient
        if model_is_sharded(self.model) and not sharded:
            raise ValueError(f"the model is FSDP sharded and the optimizer is a {type(optimizer).__name__}: IVON on "
                             f"shards is a ShardedIVON (let IVONTrainer make it: pass no optimizer)")
        if self.args.world_size > 1 and optimizer.hess_approx == "price" and not sharded:  # ivon-opt cannot sync gradsq
            optimizer.sync = True  # one passed in too: else accumulated micro-batches stay per process
        tuner = adalora_tuner(self.model)
        allocator = rank_allocator(tuner)
        if get_method(self.ivon_args.method).reads_posterior:
            if not (isinstance(allocator, PosteriorRankAllocator) and allocator.optimizer is optimizer):
                install_allocator(self.model, self.ivon_args.method, optimizer, self.ivon_args.criterion)
        elif sharded and not isinstance(allocator, SensitivityRankAllocator):  # the sensitivity on shards
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
    `delta_t` scale with the Trainer's step count. With `config.fsdp` (under torchrun or accelerate, 2 processes or
    more) the built model is sharded with torch's FSDP2 (`sharding.shard_model`) before the Trainer, and IVON's
    state and the rank allocation follow the shards. Returns an `IVONTrainer` for IVON methods, an
    `AdaLoraTrainer` (AdamW from `training_args`) for `adalora`, else a `transformers.Trainer` (a
    `ShardedTrainer` under FSDP).
    """
    refuse_accelerate_fsdp(training_args)  # before the model loads (the Trainer would refuse it on one process)
    if config.fsdp and training_args.world_size < 2:
        raise UserError("TrainConfig(fsdp=...) shards the model over processes: launch 2 or more (torchrun "
                        "--nproc_per_node N, or accelerate launch)")
    if config.fsdp and training_args.load_best_model_at_end:
        raise UserError("load_best_model_at_end does not yet read a checkpoint back into a model FSDP sharded: leave "
                        "it unset with TrainConfig(fsdp=...)")
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
    if config.fsdp:  # torch's FSDP2 over the processes torchrun or accelerate started, before the Trainer
        shard_model(model.to(training_args.device), mesh=process_mesh(training_args.device),
                    reshard_after_forward=config.fsdp == "full_shard")
    common = dict(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset)
    if config.uses_ivon:
        return IVONTrainer(**common, config=config, **trainer_kwargs)
    if config.uses_adalora:
        return AdaLoraTrainer(**common, **trainer_kwargs)
    return (ShardedTrainer if config.fsdp else Trainer)(**common, **trainer_kwargs)
