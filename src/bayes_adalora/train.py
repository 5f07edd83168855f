"""The training run, top to bottom: set-up (data, model, adapter, optimizer), then `transformers.Trainer`'s
loop, then the outputs, written all at once.

The loop is the Trainer's (its batches, checkpoints, resume, processes and mixed precision); what the run
adds rides on it as one callback, `RunRecorder`: the history of every step, the dev evaluations and the best
one, the posterior's spread where ranks are decided, the tracker, the divergence stop, and its own part of
each checkpoint. What varies between methods sits behind the method's registry entry (`methods.py`) and the
Trainer it trains with (`IVONTrainer`, `AdaLoraTrainer`, or the Trainer itself); nothing here branches on a
method's name.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .adapters import POSTERIOR_FILE, adapter_ranks, posterior_state_dict
from .allocator import CorrelationLog, install_allocator
from .build import build_trainable_model, make_optimizer, make_scheduler, on_device, resolve_device, set_peak_lr
from .checkpoint import (
    CHECKPOINTS,
    check_checkpoint_files,
    check_same_data,
    check_same_settings,
    checkpoint_dirs,
    checkpoint_settings,
    data_fingerprint,
    drop_checkpoints_from,
    read_run_state,
    write_run_state,
)
from .config import TrainConfig, plan_run, planned_config, total_steps_for
from .errors import TrainingDiverged, UserError
from .hf_trainer import AdaLoraTrainer, IVONTrainer
from .ivon_settings import data_share
from .kinds import task_kind
from .models import LABELS_FILE, causal_lm_token_loss, default_model_path, label_maps
from .predict import named_posterior_sigma
from .run_folder import TRACKER_DIR, check_output_dir, write_json, write_marker, write_outputs
from .schedules import masking_steps
from .sharding import all_sum, first_process_value, local_shard, model_is_sharded, reshard, shard_from_first_process
from .tasks import get_task
from .trackers import sigma_statistics, tracking
from .trainer_fsdp import ShardedModel, whole_trained_state

Figures = Callable[[Path], object]  # draws a finished run folder's figures into it (`plots.plot_run`)


# ---------------------------------------------------------------- set-up


def resume_checkpoint(out: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: `latest` in the output folder, or a given checkpoint folder."""
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoint_dirs(out)
        if not found:
            raise UserError(f"--resume-from-checkpoint found no checkpoint in {out / CHECKPOINTS}")
        return found[-1]
    path = Path(resume)
    if not path.is_dir() or not any(path.iterdir()) or not (path / "trainer_state.json").exists():
        raise UserError(f"--resume-from-checkpoint {resume}: no checkpoint there (a checkpoint folder holds "
                        f"trainer_state.json "
                        f"and bayes-adalora-state.json)")
    return path


def check_launcher() -> None:
    """Refuse, before any model loads, a launch that would shard the run by another engine: DeepSpeed, which
    IVON's state and the rank allocation do not read, and accelerate's FSDP plugin, whose part `--fsdp` plays."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true"):
        raise UserError("this run was launched with DeepSpeed, which bayes-adalora does not train with (IVON's state "
                        "and the rank allocation read whole or FSDP-sharded weights): launch without DeepSpeed, "
                        "and add --fsdp full_shard to shard the model")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        raise UserError("this run was launched with accelerate's FSDP configuration; bayes-adalora shards the model "
                        "itself: launch without it (plain multi-GPU) and add --fsdp full_shard")


def process_count() -> int:
    """The processes of this run: torchrun's or accelerate's WORLD_SIZE (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def divergence(loss: float, first: float, factor: float) -> str | None:
    """Why the run has diverged at this loss, or None."""
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    if factor and loss > factor * first:
        return f"the loss {loss:.4g} is over {factor:g} times the first step's {first:.4g}"
    return None


def diverged(out: Path, step: int, reason: str, first_bad: int, is_main: bool) -> TrainingDiverged:
    """The error to stop with, after deleting the checkpoints from step `first_bad` on.

    The loss of step s is computed at the weights of step s - 1, so a loss that diverges at step s
    condemns checkpoint s - 1 too.
    """
    if is_main:
        drop_checkpoints_from(out, first_bad)
    found = checkpoint_dirs(out)
    kept = f"; the last good checkpoint is {found[-1]}" if found else "; no good checkpoint is left"
    return TrainingDiverged(f"training diverged at step {step}: {reason}; lower --learning-rate{kept}")


def finite_state(model: nn.Module, optimizer) -> bool:
    """Whether every trained weight, and IVON's Hessian (the posterior) where there is one, is finite (of a
    model FSDP sharded: in every process's rows; every process must call it then)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    tensors = [local_shard(p) for p in trained] + [g["hess"] for g in optimizer.param_groups if "hess" in g]
    bad = torch.stack([(~torch.isfinite(t)).any() for t in tensors]).sum().float() if tensors else torch.zeros(())
    return all_sum(bad.reshape(1), trained).item() == 0


def score(value: float, higher_is_better: bool = True) -> float:
    """For comparing evaluations, higher is better: an undefined metric (NaN, e.g. Pearson of constant
    predictions) ranks last; a metric where lower is better (a causal LM's NLL) is negated."""
    return -math.inf if math.isnan(value) else value if higher_is_better else -value


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def draw_figures(figures: Figures, folder: Path) -> None:
    """The run's PNGs; a plotting failure is reported, and costs the run nothing."""
    try:
        figures(folder)
    except Exception as exc:
        print(f"bayes-adalora: warning: the plots were not written ({type(exc).__name__}: {exc})", file=sys.stderr)


# ---------------------------------------------------------------- what the run adds to the Trainer's loop


@dataclass
class Progress:
    """What the run has recorded so far: all its part of a checkpoint holds beyond the Trainer's."""

    history: dict = field(default_factory=lambda: {"loss": [], "lr": [], "budget": [], "eval": []})
    best: dict = field(default_factory=dict)
    final: dict = field(default_factory=dict)
    train_seconds: float = 0.0


class RunTrainerMixin(ShardedModel):
    """What the run needs of its Trainer beyond the stock one: a classifier's loss weighed as the batch's mean,
    the loss of each optimizer step (the sum of its micro-batches' `training_step` losses, which the Trainer
    scales so that it is the step's mean; under several processes, their mean), and a resume with a new --learning-rate
    (a diverged run's) that replaces the checkpoint's; of a model FSDP sharded, checkpoints gathered whole and read
    back onto the shards (`ShardedModel`)."""

    step_loss = None
    peak_lr: float | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not causal_lm_token_loss(self.accelerator.unwrap_model(model)):
            # a classifier's loss is its micro-batch's mean, which ignores a token count: without one, the
            # Trainer divides it by the micro-batches and leaves it unweighted across processes, so the step
            # trains on the batch's mean (with a count it would sum the micro-batches and multiply by the
            # process count: gradients 2x, 4x, ... the batch mean's)
            num_items_in_batch = None
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.step_loss = loss.detach() if self.step_loss is None else self.step_loss + loss.detach()
        return loss

    def pop_step_loss(self) -> float:
        loss, self.step_loss = self.step_loss, None
        if self.args.world_size > 1:
            loss = self.accelerator.reduce(loss, "mean")
        return loss.item()  # one device sync a step

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)
        if checkpoint is not None and any(base != self.peak_lr for base in scheduler.base_lrs):
            set_peak_lr(scheduler, self.optimizer, self.peak_lr)


class ProgressBar(ProgressCallback):
    """The Trainer's progress bar, without the log lines it would print below it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def checkpointing_arguments() -> dict:
    """`TrainingArguments` for activation (gradient) checkpointing, by the name this transformers gives it
    (`activation_checkpointing` from 5.25 on, `gradient_checkpointing` before, now deprecated)."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def run_trainer_class(config: TrainConfig) -> type:
    """The Trainer the method trains with, with `RunTrainerMixin`."""
    base = IVONTrainer if config.uses_ivon else AdaLoraTrainer if config.uses_adalora else Trainer
    return type(f"Run{base.__name__}", (RunTrainerMixin, base), {})


class RunRecorder(TrainerCallback):
    """After every optimizer step: the step's loss, lr and rank budget into the history, the divergence stop,
    sigma's spread at the masking steps, the tracker, the dev evaluations (every `eval_steps`, at each
    epoch's end and at the last step) and the best one; before each checkpoint, that the state is finite;
    into each checkpoint, the run's own state (`checkpoint.write_run_state`)."""

    def __init__(self, run: RunContext):
        self.run = run
        self.started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        run, done = self.run, self.run.done
        history, step, plan, config = done.history, state.global_step, run.plan, run.config
        loss = run.trainer.pop_step_loss()
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        done.train_seconds += time.perf_counter() - self.started
        reason = divergence(loss, history["loss"][0] if history["loss"] else loss, config.divergence_factor)
        if reason:
            raise diverged(run.out, step, reason, first_bad=step - 1, is_main=run.is_main)

        budget, allocated = run.allocator.budget_schedule(step) if run.allocator is not None else (None, False)
        lr_now = run.optimizer.param_groups[0]["lr"]
        history["loss"].append(loss)
        history["lr"].append(lr_now)
        history["budget"].append(budget)
        if step in run.sigma_steps:  # the posterior's spread where the ranks are first and last decided
            history.setdefault("sigma", []).append(
                {"step": step, "hessian_data_share": data_share(plan.ivon_beta2_resolved, step),
                 **sigma_statistics(named_posterior_sigma(run.model, run.optimizer, whole=True), overall=True)})
        # every process decides alike (the main one logs): under FSDP the whole sigma is gathered from all
        logs = config.report_to != ["none"] and (step % config.logging_steps == 0 or step == plan.total_steps)
        if logs:
            allocated = allocated and step <= plan.total_steps - plan.tfinal and config.uses_ivon
            sigma = sigma_statistics(named_posterior_sigma(run.model, run.optimizer, whole=True)) if allocated else {}
        if logs and run.tracker is not None:
            since = history["loss"][(step - 1) // config.logging_steps * config.logging_steps:]
            run.tracker.log({"train/loss": sum(since) / len(since), "train/lr": lr_now,
                             **({"train/rank_budget": budget} if budget is not None else {}), **sigma}, step=step)

        end_of_epoch = step % run.steps_per_epoch == 0
        if step % plan.eval_steps == 0 or step == plan.total_steps or end_of_epoch:
            done.final = run.kind.evaluate(run.model, run.dev_loaders, run.device, run.autocast)
            reshard(run.model)  # under FSDP: the shards again, which IVON and the allocation hold
            history["eval"].append({"step": step, **done.final})
            main, higher = run.spec.main_metric_name, run.spec.higher_is_better
            if not done.best or score(done.final[main], higher) > score(done.best[main], higher):
                done.best = {**done.final, "step": step}
            if run.tracker is not None:
                run.tracker.log({f"eval/{main}": done.final[main]}, step=step)
        saves = config.save_steps and step % config.save_steps == 0 and step < plan.total_steps
        # before a checkpoint: every process checks (they hold the same weights), so all stop together
        if saves and not finite_state(run.model, run.optimizer):
            raise diverged(run.out, step, "the weights are no longer finite", first_bad=step, is_main=run.is_main)

    def on_save(self, args, state, control, **kwargs):
        # every process has written its files (its RNG state) before the run's state marks the checkpoint complete
        self.run.trainer.accelerator.wait_for_everyone()
        if self.run.is_main:
            done = self.run.done
            write_run_state(Path(args.output_dir) / f"checkpoint-{state.global_step}", {
                "step": state.global_step,
                "settings": self.run.settings,  # a resume with other settings is refused
                "train_data": self.run.train_data,  # and one on other training data
                "history": done.history, "best": done.best, "final": done.final,
                "train_seconds": done.train_seconds,
                "correlations": self.run.correlations.entries if self.run.correlations is not None else [],
            })
        self.run.trainer.accelerator.wait_for_everyone()


@dataclass
class RunContext:
    """What the callback reads: the run's objects, set up once."""

    config: TrainConfig
    out: Path
    kind: object
    spec: object
    model: nn.Module
    optimizer: object
    allocator: object
    correlations: CorrelationLog | None
    dev_loaders: dict
    device: torch.device
    autocast: object
    plan: object
    settings: dict
    train_data: dict | None
    steps_per_epoch: int
    sigma_steps: tuple
    is_main: bool
    done: Progress = field(default_factory=Progress)
    tracker: object = None
    trainer: Trainer | None = None


# ---------------------------------------------------------------- the run


def train(config: TrainConfig, figures: Figures | None = None) -> dict:
    """Fine-tune on the task as `config` says; writes the run to `config.output_dir`, returns results.

    `figures` (e.g. `plots.plot_run`) draws the run's PNGs into the folder when `config.plots` is on.
    """
    with ExitStack() as closing:  # what the run opened (its tracker) is closed, as failed when it raises
        return _train(config, figures, closing)


def _train(config: TrainConfig, figures: Figures | None, closing: ExitStack) -> dict:
    kind = task_kind(get_task(config.task))  # what varies with the task: data, model, batches, metrics
    out = Path(config.output_dir)
    check_output_dir(out, config.overwrite, config.resume_from_checkpoint)
    resume_from = resume_checkpoint(out, config.resume_from_checkpoint)
    lr_derived = False  # the checkpoint's lr, taken below, stays derived in config.json as it was there
    if resume_from is not None and config.learning_rate is None:  # unset, the lr is the checkpoint's, not the default
        saved = checkpoint_settings(resume_from) or {}
        lr_derived = "learning_rate" in (saved.get("derived") or [])
        if saved.get("learning_rate") is not None:
            config = dataclasses.replace(config, learning_rate=saved["learning_rate"])
    device = resolve_device(config.device)
    check_launcher()
    world = process_count()
    micro = world * config.gradient_accumulation_steps
    if config.per_device_train_batch_size is not None:  # the Trainer's count: the batch follows the processes
        config = dataclasses.replace(config, batch_size=config.per_device_train_batch_size * micro)
    if config.batch_size % micro:
        raise UserError(f"--batch-size {config.batch_size} is the global batch and must divide among {world} "
                        f"processes x {config.gradient_accumulation_steps} micro-batches")
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))

    data = kind.read_data(config)
    spec = data.spec  # classification on the user's own data: with the classes of its training file
    set_seed(config.seed)  # before the model: the seed also fixes the new head's and the adapter's first weights
    model_name = config.model or default_model_path()
    if config.fsdp:  # the process group first: under FSDP only the first process reads the weights
        if world < 2:
            raise UserError("--fsdp shards the model over processes: launch 2 or more (torchrun --nproc_per_node N, "
                            "or accelerate launch)")
        start_processes(device)
    empty = bool(config.fsdp) and rank != 0  # built on the meta device; its rows come from the first process
    tokenizer, model, fresh = kind.load_model(model_name, config, device, weights=not empty)
    if config.fsdp:
        fresh = first_process_value(fresh)  # which modules are new: known where the weights were read
    kind.check_processes(model, world)
    train_set = kind.train_dataset(data, tokenizer, config)
    if not train_set:
        raise UserError("the training data holds no example to train on")
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    dev_loaders = {split: kind.dev_loader(ds, tokenizer, config) for split, ds in data.dev.items()}
    # the adapter first (its size sets --ivon-ess auto); its length is the plan's, from the same two numbers
    model = build_trainable_model(model, config, total_steps_for(config, steps_per_epoch), fresh)
    # under FSDP the first process keeps the whole model in CPU memory: each block goes to the device as it is sharded
    model = model if config.fsdp else on_device(model, device)
    if config.fsdp:  # before the optimizer: IVON's state is made beside each process's rows
        shard_from_first_process(model, device, reshard_after_forward=config.fsdp == "full_shard")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = plan_run(config, model_name, len(data.train), steps_per_epoch, spec, trainable_parameters=trainable)
    settings = planned_config(config, plan)  # config.json's form: kept in checkpoints, checked on resume
    if lr_derived and "learning_rate" not in settings["derived"]:  # a --config rerun derives it again, as the first
        settings["derived"].append("learning_rate")
    train_data = data_fingerprint(data.train) if config.save_steps or resume_from is not None else None

    model.train()
    optimizer = make_optimizer(model, config, plan.ivon_ess_resolved, sync=world > 1, total_steps=plan.total_steps)
    scheduler = make_scheduler(config, optimizer, plan.total_steps, plan.warmup_steps)
    correlations = CorrelationLog() if config.logs_correlations else None
    allocator = install_allocator(model, config.method, optimizer, config.criterion, correlations)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if config.bf16 else nullcontext()
    sigma_steps = (masking_steps(plan.total_steps, plan.tinit, plan.tfinal, plan.delta_t) or ()) \
        if config.uses_ivon and config.uses_adalora else ()
    run = RunContext(config, out, kind, spec, model, optimizer, allocator, correlations, dev_loaders, device,
                     autocast, plan, settings, train_data, steps_per_epoch, sigma_steps, is_main=rank == 0)

    if resume_from is not None:
        state = read_run_state(resume_from)
        # the data first: another training set changes what the run derives from its size (IVON's ess, the
        # step count of --num-train-epochs), and the message must name the data, not the setting derived from it
        check_same_data(resume_from, state.get("train_data"), train_data)
        check_same_settings(resume_from, state.get("settings"), settings)
        check_checkpoint_files(resume_from)
        run.done = Progress(state["history"], state["best"], state["final"], state["train_seconds"])
        if correlations is not None:
            correlations.entries.extend(state.get("correlations", []))
    elif (out / CHECKPOINTS).is_dir() and run.is_main:
        shutil.rmtree(out / CHECKPOINTS)  # --overwrite (checked above): the old run's checkpoints go
    if resume_from is None and run.is_main:  # a new run's curves are not mixed into an old run's (or a failed one's)
        shutil.rmtree(out / TRACKER_DIR, ignore_errors=True)

    # the tracker first: one whose package is missing is refused before anything is written
    run.tracker = closing.enter_context(tracking(config.report_to, out, settings)) if run.is_main else None
    # checkpoints go to the run's folder; without them the Trainer's folder is a scratch one, so a run that
    # fails leaves nothing behind
    checkpoints = out / CHECKPOINTS if config.save_steps else Path(closing.enter_context(TemporaryDirectory()))
    args = TrainingArguments(
        output_dir=str(checkpoints), max_steps=plan.total_steps, learning_rate=plan.learning_rate,
        per_device_train_batch_size=config.batch_size // micro, seed=config.seed,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        **(checkpointing_arguments() if config.gradient_checkpointing else {}),
        save_strategy="steps" if config.save_steps else "no", save_steps=config.save_steps or 1,
        save_total_limit=config.save_total_limit, eval_strategy="no", logging_strategy="no", report_to=[],
        disable_tqdm=not (config.progress and run.is_main), bf16=config.bf16, use_cpu=device.type == "cpu",
        max_grad_norm=0.0, remove_unused_columns=False, dataloader_num_workers=0,
    )
    trainer_class = run_trainer_class(config)
    extra = {"config": config} if config.uses_ivon else {}
    trainer = trainer_class(model=model, args=args, train_dataset=train_set, data_collator=kind.collator(tokenizer),
                            optimizers=(optimizer, scheduler), callbacks=[RunRecorder(run)], **extra)
    trainer.peak_lr = plan.learning_rate
    # the run prints its own summary: the Trainer's logs (its closing train_runtime line) are not printed
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ProgressBar)
    run.trainer = trainer

    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    done = run.done
    if not finite_state(model, optimizer):  # the last update is checked too, before anything is written
        raise diverged(out, plan.total_steps, "the weights are not finite after the last update",
                       first_bad=plan.total_steps, is_main=run.is_main)

    mc = {}
    if config.mc_samples:  # once, at the end: K passes over the dev data
        mc = kind.evaluate_sampled(model, dev_loaders, device, autocast, named_posterior_sigma(model, optimizer),
                                   config.mc_samples, config.seed)
        reshard(model)
    ranks = adapter_ranks(model) if config.method_spec.adapter is not None else {}
    if not same_everywhere(trainer, ranks):  # every process must have masked the same triplets
        raise RuntimeError("the processes ended with different rank patterns; please report this as a bug")
    results = {
        "task": spec.name,
        "method": config.method,
        "criterion": config.criterion if config.method_spec.reads_posterior else None,
        "model": model_name,
        "seed": config.seed,
        "steps": plan.total_steps,
        "metrics": {"final": done.final, "best": done.best, **({"mc": mc} if mc else {})},
        "main_metric": spec.main_metric_name,
        **label_maps(spec),
        "train_seconds": done.train_seconds,
        "seconds_per_step": done.train_seconds / plan.total_steps,
        "peak_memory_mb": peak_memory_mb(device),
        "trainable_parameters": trainable,
        "final_ranks": ranks,
        "total_rank": sum(ranks.values()),
        "train_examples": len(data.train),
        "device": str(device),
        "processes": world,
    }
    # what the files hold, whole: every process takes part where FSDP sharded it
    trained_state = whole_trained_state(model, config.method_spec.adapter is None) if model_is_sharded(model) else None
    posterior = posterior_state_dict(optimizer, {p: n for n, p in model.named_parameters()}) \
        if config.uses_ivon else None
    if run.is_main:
        write_outputs(out, lambda folder: write_run(folder, config, settings, model, tokenizer, posterior,
                                                    done.history, results, allocator, correlations, figures,
                                                    trained_state))
    trainer.accelerator.wait_for_everyone()
    return results


def same_everywhere(trainer: Trainer, value) -> bool:
    """Whether every process holds an equal `value` (compared by a digest of its pickle)."""
    if trainer.args.world_size == 1:
        return True
    import hashlib
    import pickle

    from accelerate.utils import gather_object

    digest = hashlib.sha256(pickle.dumps(value)).hexdigest()
    return len(set(gather_object([digest]))) == 1


def start_processes(device: torch.device) -> None:
    """The process group, before the Trainer's arguments would start it: FSDP shards over it (accelerate's
    state, which the Trainer then takes over, with each process on its own GPU)."""
    from accelerate import PartialState

    PartialState(cpu=device.type == "cpu")


def write_run(folder: Path, config: TrainConfig, settings: dict, model: nn.Module, tokenizer, posterior, history: dict,
              results: dict, allocator, correlations: CorrelationLog | None, figures: Figures | None,
              trained_state: dict | None = None) -> None:
    """Every file of a finished run, into `folder`; `settings` is config.json (`planned_config`); `posterior`:
    `adapters.posterior_state_dict`'s tensors and metadata (IVON methods); `trained_state`: the trained tensors
    gathered whole (FSDP, `whole_trained_state`), else the model's own are written."""
    given = {"state_dict": trained_state} if trained_state else {}
    if config.method_spec.adapter is None:
        model.save_pretrained(folder / "model", **given)
        tokenizer.save_pretrained(folder / "model")
    else:
        model.save_pretrained(folder / "adapter", **given)
        if "id2label" in results:  # the class names beside the adapter (model/config.json holds them for full)
            write_json({k: results[k] for k in ("id2label", "label2id")}, folder / "adapter" / LABELS_FILE)
    if posterior is not None:
        tensors, meta = posterior
        save_file(tensors, folder / POSTERIOR_FILE, metadata=meta)
    write_json(settings, folder / "config.json")
    write_marker(folder, "run")  # what --overwrite and the other commands know a run by (not its config.json)
    write_json(history, folder / "history.json")
    write_json(results, folder / "results.json")
    if correlations is not None:
        write_json({"sensitivity": allocator.sensitivity_kind, "triplets": allocator.init_bgt,
                    "steps": correlations.entries}, folder / "correlations.json")
    if config.plots and figures is not None:
        draw_figures(figures, folder)
