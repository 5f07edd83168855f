"""`IVONArguments`: what the Trainer path needs beyond `TrainingArguments` (method, criterion, AdaLoRA's
budget, IVON's settings, train MC samples), checked on creation with `TrainConfig`'s field bounds, and read by
`HfArgumentParser` from the command line, a JSON file or a YAML file as `TrainingArguments` is; and the
Trainer's step count, by its own arithmetic."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from peft import AdaLoraConfig
from transformers import TrainingArguments

from .config import TrainConfig, adalora_phases, check_field, coerce_field
from .errors import UserError
from .ivon_settings import NumberOrWord
from .methods import METHODS, get_method

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
            raise UserError(f"the Trainer path trains an AdaLoRA method ({', '.join(ADALORA_METHODS)}), "
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
