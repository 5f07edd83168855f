"""The training run, top to bottom: set-up (data, model, adapter, optimizer), the loop (step,
allocate, evaluate, checkpoint), then the outputs, written all at once.

What varies between methods sits behind the method's registry entry (`methods.py`) and one step
interface (`steps.py`); nothing here branches on a method's name.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import set_seed

from .adapters import POSTERIOR_FILE, adapter_ranks, posterior_state_dict
from .allocator import CorrelationLog, install_allocator
from .build import (
    build_trainable_model,
    lr_multiplier,
    make_optimizer,
    make_training_step,
    on_device,
    resolve_device,
    set_peak_lr,
)
from .checkpoint import (
    CHECKPOINTS,
    checkpoint_dirs,
    checkpoint_settings,
    data_fingerprint,
    drop_checkpoints_from,
    load_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig, plan_run, planned_config, total_steps_for
from .distributed import Processes
from .errors import TrainingDiverged, UserError
from .ivon_settings import data_share
from .kinds import task_kind
from .models import LABELS_FILE, default_model_path, label_maps
from .predict import named_posterior_sigma
from .run_folder import TRACKER_DIR, check_output_dir, write_json, write_marker, write_outputs
from .schedules import masking_steps
from .tasks import get_task
from .trackers import sigma_statistics, tracking

Figures = Callable[[Path], object]  # draws a finished run folder's figures into it (`plots.plot_run`)


# ---------------------------------------------------------------- set-up


def resume_checkpoint(out: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: `latest` in the output folder, or a given checkpoint folder."""
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoint_dirs(out)
        if not found:
            raise UserError(f"--resume found no checkpoint in {out / CHECKPOINTS}")
        return found[-1]
    path = Path(resume)
    if not (path / "state.pt").exists():
        raise UserError(f"--resume {resume}: no checkpoint there (a checkpoint folder holds state.pt)")
    return path


def forward_backward(model: nn.Module, batch: dict, autocast, loss_kwargs: dict | None = None,
                     scale: float = 1.0) -> torch.Tensor:
    """Forward and backward of `batch`; `loss_kwargs` (the kind's, e.g. `num_items_in_batch`) go to the forward,
    and the loss is multiplied by `scale` (the kind's `loss_scale`) before backward; returns what was backpropagated."""
    with autocast:
        loss = model(**batch, **(loss_kwargs or {})).loss
    if scale != 1.0:
        loss = loss * scale
    loss.backward()
    return loss


@dataclass
class Progress:
    """What the loop has done so far: all a checkpoint must hold beyond the model and optimizer."""

    step: int = 0
    history: dict = field(default_factory=lambda: {"loss": [], "lr": [], "budget": [], "eval": []})
    best: dict = field(default_factory=dict)
    final: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    batch_in_epoch: int = 0  # batches of the current epoch already trained (resume)


def divergence(loss: float, first: float, factor: float) -> str | None:
    """Why the run has diverged at this loss, or None."""
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    if factor and loss > factor * first:
        return f"the loss {loss:.4g} is over {factor:g} times the first step's {first:.4g}"
    return None


def diverged(out: Path, step: int, reason: str, first_bad: int, procs: Processes) -> TrainingDiverged:
    """The error to stop with, after deleting the checkpoints from step `first_bad` on.

    The loss of step s is computed at the weights of step s - 1, so a loss that diverges at step s
    condemns checkpoint s - 1 too.
    """
    if procs.is_main:
        drop_checkpoints_from(out, first_bad)
    found = checkpoint_dirs(out)
    kept = f"; the last good checkpoint is {found[-1]}" if found else "; no good checkpoint is left"
    return TrainingDiverged(f"training diverged at step {step}: {reason}; lower --lr{kept}")


def finite_state(model: nn.Module, optimizer) -> bool:
    """Whether every trained weight, and IVON's Hessian (the posterior) where there is one, is finite."""
    weights = all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)
    return weights and all(torch.isfinite(g["hess"]).all() for g in optimizer.param_groups if "hess" in g)


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
    check_output_dir(out, config.overwrite, config.resume)
    resume_from = resume_checkpoint(out, config.resume)
    lr_derived = False  # the checkpoint's lr, taken below, stays derived in config.json as it was there
    if resume_from is not None and config.lr is None:  # unset, the lr is the checkpoint's (not the default)
        saved = checkpoint_settings(resume_from) or {}
        lr_derived = "lr" in (saved.get("derived") or [])
        config = dataclasses.replace(config, lr=saved["lr"]) if saved.get("lr") is not None else config
    device = resolve_device(config.device)
    procs = Processes.start(device, config.batch_size)
    device = procs.device or device

    data = kind.read_data(config)
    spec = data.spec  # classification on the user's own data: with the classes of its training file
    set_seed(config.seed)  # before the model: the seed also fixes the new head's and the adapter's first weights
    model_name = config.model or default_model_path()
    tokenizer, model, fresh = kind.load_model(model_name, config, device)
    kind.check_processes(model, procs.world)
    train_loader = kind.train_loader(data, tokenizer, config, min_last=procs.world)  # an empty shard's loss: NaN
    dev_loaders = {split: kind.dev_loader(ds, tokenizer, config) for split, ds in data.dev.items()}
    # the adapter first (its size sets --ivon-ess auto); its length is the plan's, from the same two numbers
    model = on_device(build_trainable_model(model, config, total_steps_for(config, len(train_loader)), fresh), device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = plan_run(config, model_name, len(data.train), len(train_loader), spec, trainable_parameters=trainable)
    settings = planned_config(config, plan)  # config.json's form: kept in checkpoints, checked on resume
    if lr_derived and "lr" not in settings["derived"]:  # so --config of this run derives it again, as of the first
        settings["derived"].append("lr")
    train_data = data_fingerprint(data.train) if config.save_steps or resume_from is not None else None

    forward_model = procs.wrap(model)  # DDP under accelerate; peft's allocator works on `model`
    model.train()
    optimizer = make_optimizer(model, config, plan.ivon_ess_resolved, sync=procs.world > 1,
                               total_steps=plan.total_steps)
    training_step = make_training_step(optimizer, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config, plan.total_steps, plan.warmup_steps))
    correlations = CorrelationLog() if config.logs_correlations else None
    allocator = install_allocator(model, config.method, optimizer, config.criterion, correlations)
    tuner = model.base_model if allocator is not None else None  # peft's AdaLoraModel drives the allocator
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if config.bf16 else nullcontext()

    done = Progress()
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, scheduler, tuner, settings, train_data)
        done = Progress(state["step"], state["history"], state["best"], state["final"], state["train_seconds"],
                        state["batch_in_epoch"])
        train_loader.generator.set_state(state["loader_generator"])
        older = done.history.pop("correlations", [])  # where earlier checkpoints kept the log
        if correlations is not None:
            correlations.entries.extend(state.get("correlations", older))
        if any(base != plan.lr for base in scheduler.base_lrs):  # e.g. resuming a diverged run with a lower --lr
            set_peak_lr(scheduler, optimizer, plan.lr)
        if config.uses_ivon and state.get("ivon_noise") is not None:
            training_step.noise.load_state(state["ivon_noise"])
    elif (out / CHECKPOINTS).is_dir() and procs.is_main:
        shutil.rmtree(out / CHECKPOINTS)  # --overwrite (checked above): the old run's checkpoints go
    if resume_from is None and procs.is_main:  # a new run's curves are not mixed into an old run's (or a failed one's)
        shutil.rmtree(out / TRACKER_DIR, ignore_errors=True)

    history = done.history
    sigma_steps = (masking_steps(plan.total_steps, plan.tinit, plan.tfinal, plan.delta_t) or ()) \
        if config.uses_ivon and config.uses_adalora else ()
    tracker = (closing.enter_context(tracking(config.report_to, out, settings))
               if procs.is_main else None)
    bar = tqdm(total=plan.total_steps, initial=done.step, disable=not (config.progress and procs.is_main),
               desc=f"{config.method} {spec.name}", dynamic_ncols=True)
    while done.step < plan.total_steps:
        epoch_start = train_loader.generator.get_state()  # the epoch's order is drawn from it
        for index, batch in enumerate(train_loader):
            if index < done.batch_in_epoch:
                continue
            t0 = time.perf_counter()
            loss_kwargs = kind.loss_kwargs(batch, procs.world)  # of the global batch: the same in every process
            shard = procs.shard(batch)
            scale = kind.loss_scale(len(batch["input_ids"]), len(shard["input_ids"]), procs.world)
            batch = {k: v.to(device) for k, v in shard.items()}
            # every IVON sample runs the same partial, so each gets the same loss_kwargs and scale
            loss = training_step.gradients(partial(forward_backward, forward_model, batch, autocast, loss_kwargs,
                                                   scale))
            training_step.update()
            loss = procs.mean(loss.item())  # the batch's loss; one device sync per step
            done.step += 1
            step = done.step
            if tuner is not None:
                tuner.update_and_allocate(step)
            scheduler.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            done.train_seconds += time.perf_counter() - t0
            reason = divergence(loss, history["loss"][0] if history["loss"] else loss, config.divergence_factor)
            if reason:
                raise diverged(out, step, reason, first_bad=step - 1, procs=procs)

            budget, allocated = allocator.budget_schedule(step) if allocator is not None else (None, False)
            lr_now = optimizer.param_groups[0]["lr"]
            history["loss"].append(loss)
            history["lr"].append(lr_now)
            history["budget"].append(budget)
            if step in sigma_steps:  # the posterior's spread where the ranks are first and last decided
                history.setdefault("sigma", []).append(
                    {"step": step, "hessian_data_share": data_share(plan.ivon_beta2_resolved, step),
                     **sigma_statistics(named_posterior_sigma(model, optimizer), overall=True)})
            if tracker is not None:
                allocated = allocated and step <= plan.total_steps - plan.tfinal and config.uses_ivon
                sigma = sigma_statistics(named_posterior_sigma(model, optimizer)) if allocated else {}
                tracker.log({"train/loss": loss, "train/lr": lr_now,
                             **({"train/rank_budget": budget} if budget is not None else {}), **sigma}, step=step)
            bar.update(1)
            if step % 10 == 0 or step == plan.total_steps:
                bar.set_postfix({"loss": f"{loss:.4f}", "lr": f"{lr_now:.3g}",
                                 **({"rank budget": budget} if budget is not None else {})})

            end_of_epoch = index == len(train_loader) - 1
            if step % plan.eval_steps == 0 or step == plan.total_steps or end_of_epoch:
                done.final = kind.evaluate(model, dev_loaders, device, autocast)
                history["eval"].append({"step": step, **done.final})
                main, higher = spec.main_metric_name, spec.higher_is_better
                if not done.best or score(done.final[main], higher) > score(done.best[main], higher):
                    done.best = {**done.final, "step": step}
                if tracker is not None:
                    tracker.log({f"eval/{spec.main_metric_name}": done.final[spec.main_metric_name]}, step=step)
            if config.save_steps and step % config.save_steps == 0 and step < plan.total_steps:
                # every process checks (they hold the same weights), so all stop together
                if not finite_state(model, optimizer):
                    raise diverged(out, step, "the weights are no longer finite", first_bad=step, procs=procs)
                # (at an epoch's last batch the sampler has yet to draw once more from the generator,
                # so the next epoch's start is not known here: a resume replays this epoch's order)
                extra = {
                    "settings": settings,  # a resume with other settings is refused
                    "train_data": train_data,  # and one on other training data
                    "ivon_noise": training_step.noise.state if config.uses_ivon else None,
                    "history": history,
                    "best": done.best,
                    "final": done.final,
                    "train_seconds": done.train_seconds,
                    "loader_generator": epoch_start,
                    "batch_in_epoch": index + 1,
                    "correlations": correlations.entries if correlations is not None else [],
                }
                if procs.is_main:
                    save_checkpoint(out, step, model, optimizer, scheduler, tuner, extra, config.save_total_limit)
                procs.wait()
            if step >= plan.total_steps:
                break
        done.batch_in_epoch = 0
    bar.close()
    if not finite_state(model, optimizer):  # the last update is checked too, before anything is written
        raise diverged(out, done.step, "the weights are not finite after the last update", first_bad=done.step,
                       procs=procs)

    mc = {}
    if config.mc_samples:  # once, at the end: K passes over the dev data
        mc = kind.evaluate_sampled(model, dev_loaders, device, autocast, named_posterior_sigma(model, optimizer),
                                   config.mc_samples, config.seed)
    ranks = adapter_ranks(model) if config.method_spec.adapter is not None else {}
    if not procs.same_everywhere(ranks):  # every process must have masked the same triplets
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
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "final_ranks": ranks,
        "total_rank": sum(ranks.values()),
        "train_examples": len(data.train),
        "device": str(device),
        "processes": procs.world,
    }
    if procs.is_main:
        write_outputs(out, lambda folder: write_run(folder, config, settings, model, tokenizer, optimizer, history,
                                                    results, allocator, correlations, figures))
    procs.wait()
    return results


def write_run(folder: Path, config: TrainConfig, settings: dict, model: nn.Module, tokenizer, optimizer, history: dict,
              results: dict, allocator, correlations: CorrelationLog | None, figures: Figures | None) -> None:
    """Every file of a finished run, into `folder`; `settings` is config.json (`planned_config`)."""
    if config.method_spec.adapter is None:
        model.save_pretrained(folder / "model")
        tokenizer.save_pretrained(folder / "model")
    else:
        model.save_pretrained(folder / "adapter")
        if "id2label" in results:  # the class names beside the adapter (model/config.json holds them for full)
            write_json({k: results[k] for k in ("id2label", "label2id")}, folder / "adapter" / LABELS_FILE)
    if config.uses_ivon:
        tensors, meta = posterior_state_dict(optimizer, {p: n for n, p in model.named_parameters()})
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
