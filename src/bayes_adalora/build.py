"""The run's parts wired from a config: the adapter model (peft), the optimizer, the step, the
learning-rate schedule and the device. Everything that branches on the method reads its registry entry.

The fast path of the AdaLoRA methods (`fast_adalora`, `ivon_inplace`; `TrainConfig.fast_path`, on by
default) is switched on here and only here: `build_trainable_model` gives the model fast_adalora's
tuner and layers, `make_optimizer` makes IVON an `InplaceIVON`, and `use_fast_path` does both for a
model or optimizer built elsewhere (the Trainer integration's). A model built to read a saved adapter
back (`build_adapter_model`, the `evaluate` command) keeps stock peft's classes."""

from __future__ import annotations

import ivon
import torch
from peft import AdaLoraConfig, LoraConfig, TaskType, get_peft_model
from torch import nn

from .adapters import PAPER_LAMBDA_STD, init_lambdas_normal
from .config import DEVICE, TrainConfig, adalora_phases
from .errors import UserError
from .fast_adalora import enable_fast_optimizer, enable_fast_path
from .ivon_inplace import ShardedIVON
from .ivon_settings import AUTO, resolve_beta2
from .models import FAN_IN_FAN_OUT_TYPES, plan_adapter_modules, target_module_suffixes
from .schedules import two_phase
from .sharding import is_sharded
from .steps import AdamWStep, IVONStep, NoiseStream
from .tasks import get_task


def resolve_device(name: str) -> torch.device:
    if not DEVICE.match(name):
        raise UserError(f"--device {name!r} is not a device: choose cpu, cuda, cuda:N or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UserError(f"--device {name}: this machine has {count} CUDA device{'s' if count > 1 else ''} "
                        f"(cuda:0 to cuda:{count - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name} asked for Apple's Metal (MPS), which this torch build or machine lacks: "
                        f"choose cpu{', cuda' if torch.cuda.is_available() else ''} or auto")
    return device


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` moved to `device`; a base quantized by bitsandbytes (--load-in) was loaded there and refuses `.to`."""
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        return model
    return model.to(device)


def fast_path_applies(config: TrainConfig) -> bool:
    """The fast path is asked for (`--fast-path`, the default) and the method has AdaLoRA's adapter."""
    return config.fast_path and config.uses_adalora


def use_fast_path(model: nn.Module, config: TrainConfig, optimizer=None):
    """Where the config asks for it, switch a built model and its optimizer to the fast path (a no-op
    for those already on it, and for other methods); returns the optimizer."""
    return enable_fast_path(model, optimizer) if fast_path_applies(config) else optimizer


def build_trainable_model(model: nn.Module, config: TrainConfig, total_steps: int, fresh: set[str]) -> nn.Module:
    """The model to train: `build_adapter_model`, on the fast path where the config asks for it."""
    model = build_adapter_model(model, config, total_steps, fresh)
    use_fast_path(model, config)
    return model


def build_adapter_model(model: nn.Module, config: TrainConfig, total_steps: int, fresh: set[str]) -> nn.Module:
    """Wrap `model` with the method's adapter (stock peft), or leave it whole for full fine-tuning."""
    adapter = config.method_spec.adapter
    if adapter is None:
        model.requires_grad_(True)
        return model
    suffixes = target_module_suffixes(model.config.model_type, config.target_modules)
    targets, trained_in_full = plan_adapter_modules(model, suffixes, fresh)
    common = dict(
        task_type=TaskType(get_task(config.task).peft_task_type), target_modules=targets,
        modules_to_save=trained_in_full, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        fan_in_fan_out=model.config.model_type in FAN_IN_FAN_OUT_TYPES,
    )
    model = get_peft_model(model, ADAPTERS[adapter](config, total_steps, common))
    if config.lambda_init == "paper":  # AdaLoRA's alone (TrainConfig refuses it for other methods)
        init_lambdas_normal(model, PAPER_LAMBDA_STD)
    return model


def lora_config(config: TrainConfig, total_steps: int, common: dict) -> LoraConfig:
    return LoraConfig(r=config.lora_r, **common)


def adalora_config(config: TrainConfig, total_steps: int, common: dict) -> AdaLoraConfig:
    tinit, tfinal, delta_t = adalora_phases(config, total_steps)
    return AdaLoraConfig(
        init_r=config.init_r, target_r=config.target_r, tinit=tinit, tfinal=tfinal, deltaT=delta_t,
        beta1=config.sensitivity_beta1, beta2=config.sensitivity_beta2, orth_reg_weight=config.orth_reg,
        total_step=total_steps, **common,
    )


# `Method.adapter` -> the peft config of its adapter, from the run's settings, length and the common keywords
ADAPTERS = {"lora": lora_config, "adalora": adalora_config}


def make_optimizer(model: nn.Module, config: TrainConfig, ess: float, sync: bool = False,
                   total_steps: int | None = None):
    """IVON or AdamW over the trainable parameters, at `config.learning_rate` (else the method's default); on the
    fast path IVON is an `InplaceIVON` (ivon-opt's numbers, in place). `total_steps`: the run's length,
    which `--ivon-beta2 auto` follows."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr = config.resolved_lr()
    half = next((p.dtype for p in params if p.dtype in (torch.float16, torch.bfloat16)), None)
    if config.uses_ivon and half is not None:
        # IVON keeps its state in the weights' dtype. fp16: ess * (h + weight_decay) passes 65504, so the noise
        # and the Hessian update are 0 and inf. bf16: beta2 0.99999 rounds to 1 and (1 - beta2) * h's update
        # vanishes against h, so the Hessian never moves and the posterior stays the prior
        raise UserError(f"--method {config.method} cannot train {'fp16' if half == torch.float16 else 'bf16'} "
                        f"weights (IVON keeps its Hessian in their dtype, where it "
                        f"{'overflows' if half == torch.float16 else 'cannot move'}): keep the adapter in fp32 "
                        f"(peft's default; --bf16 autocasts the compute and keeps fp32 weights)")
    return OPTIMIZERS[config.method_spec.optimizer](params, config, lr, ess, sync, total_steps)


def make_ivon(params: list, config: TrainConfig, lr: float, ess: float, sync: bool, total_steps: int | None):
    if any(is_sharded(p) for p in params):  # FSDP: IVON's state beside each process's rows, nothing to sync
        return ShardedIVON(
            params, lr=lr, ess=ess, hess_init=config.ivon_hess_init, beta1=config.ivon_beta1,
            beta2=ivon_beta2(config, total_steps), weight_decay=config.ivon_weight_decay,
            mc_samples=config.train_mc_samples, clip_radius=config.ivon_clip_radius,
        )
    optimizer = ivon.IVON(
        params, lr=lr, ess=ess, hess_init=config.ivon_hess_init, beta1=config.ivon_beta1,
        beta2=ivon_beta2(config, total_steps), weight_decay=config.ivon_weight_decay,
        mc_samples=config.train_mc_samples, clip_radius=config.ivon_clip_radius, sync=sync,
    )
    return enable_fast_optimizer(optimizer) if fast_path_applies(config) else optimizer


def make_adamw(params: list, config: TrainConfig, lr: float, ess: float, sync: bool, total_steps: int | None):
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)


# `Method.optimizer` -> its factory (the trainable parameters, the settings, the peak lr, IVON's ess, whether
# processes sync its state, the run's length) and its step for a loop of one's own (`make_training_step`)
OPTIMIZERS = {"ivon": make_ivon, "adamw": make_adamw}


def ivon_beta2(config: TrainConfig, total_steps: int | None) -> float:
    """IVON's beta2 for the run: the setting, or with `auto` one that follows `total_steps`."""
    if config.ivon_beta2 == AUTO and total_steps is None:
        raise ValueError("--ivon-beta2 auto follows the run's length: give make_optimizer total_steps")
    return resolve_beta2(config.ivon_beta2, total_steps or 1)


def make_training_step(optimizer, config: TrainConfig):
    """The method's step (`steps.py`): IVON's sampled step with `train_mc_samples` draws, its noise from a
    `NoiseStream` of the run's seed (the same in every process), or AdamW's."""
    return STEPS[config.method_spec.optimizer](optimizer, config)


def ivon_step(optimizer, config: TrainConfig) -> IVONStep:
    device = next(p.device for group in optimizer.param_groups for p in group["params"] if p is not None)
    return IVONStep(optimizer, config.train_mc_samples, NoiseStream(config.seed, device))


STEPS = {"ivon": ivon_step, "adamw": lambda optimizer, config: AdamWStep(optimizer)}  # `Method.optimizer` -> step


def make_scheduler(config: TrainConfig, optimizer, total_steps: int, warmup: int):
    """The learning-rate schedule of --lr-scheduler-type: transformers' (`get_scheduler`, with the warm-up), or
    the paper's two-phase IVON schedule; both are a `LambdaLR`, so `set_peak_lr` can change their peak."""
    if config.lr_scheduler_type == "two-phase":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: two_phase(
            s, warmup, config.two_phase_const, config.two_phase_first, config.two_phase_second, total_steps))
    from transformers import get_scheduler

    try:
        return get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                             num_training_steps=total_steps)
    except ValueError as err:  # e.g. polynomial's end (1e-7) above the peak learning rate
        raise UserError(f"--lr-scheduler-type {config.lr_scheduler_type} cannot follow this run: {err}") from None


def set_peak_lr(scheduler, optimizer, lr: float) -> None:
    """Make `lr` the schedule's peak from here on (a resumed run given a new --learning-rate,
    e.g. after a divergence)."""
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = lr * factor(scheduler.last_epoch)
