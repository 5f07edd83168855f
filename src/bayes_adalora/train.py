"""The training run, top to bottom: data, model, adapter, optimizer, steps, evaluation, outputs."""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from .allocator import install_correlation_logger, install_posterior_allocator
from .checkpoint import CHECKPOINTS, checkpoint_dirs, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import encode, load_task_data, make_loader
from .distributed import Processes
from .errors import TrainingDiverged, UserError
from .evaluation import mc_predictive, point_predictive, predictive_metrics
from .fast_adalora import enable_fast_path
from .models import default_model_path, load_model, plan_adapter_modules, target_module_suffixes
from .posterior import posterior_sigma, posterior_state_dict
from .schedules import constant_warmup, default_adalora_phases, linear_warmup_decay, two_phase
from .tasks import TaskSpec, get_task

RUN_MARKERS = ("results.json", "config.json")
RUN_FILES = ("adapter", "model", "posterior.safetensors", "history.json", "correlations.json",
             "ranks.png", "training.png", "sigma.png", "correlations.png")  # --overwrite replaces them all


# ---------------------------------------------------------------- set-up


def check_output_dir(path: Path, overwrite: bool, resume: str | None = None) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"--output-dir {path} is a file, not a folder")
    if not path.is_dir():
        return
    holds_run = any((path / m).exists() for m in RUN_MARKERS)
    holds_checkpoints = (path / CHECKPOINTS).is_dir()
    if holds_run and not overwrite:
        raise UserError(f"{path} already holds a run: pass --overwrite to replace it, or choose another --output-dir")
    if holds_checkpoints and not holds_run and not (overwrite or resume):
        raise UserError(f"{path} holds an unfinished run: pass --resume to continue it, or --overwrite to start again")
    # refused up front, not after training; and --overwrite only ever deletes a run, never other files
    others = [p for p in path.iterdir() if p.name not in (*RUN_MARKERS, CHECKPOINTS, *RUN_FILES)]
    if not holds_run and not holds_checkpoints and others:
        raise UserError(f"--output-dir {path} holds files that are not a run: choose a new or empty folder")


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, but no CUDA device is available")
    return device


def total_steps_for(config: TrainConfig, batches_per_epoch: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(config.epochs * batches_per_epoch))


def adalora_phases(config: TrainConfig, total_steps: int) -> tuple[int, int, int]:
    """(tinit, tfinal, delta_t): the flags where given, else defaults that scale with the run."""
    tinit, tfinal, delta_t = default_adalora_phases(total_steps)
    tinit = config.tinit if config.tinit is not None else tinit
    tfinal = config.tfinal if config.tfinal is not None else tfinal
    delta_t = config.delta_t if config.delta_t is not None else delta_t
    if tinit < 0 or tfinal < 0 or tinit >= total_steps - tfinal:
        raise UserError(
            f"--tinit {tinit} and --tfinal {tfinal} leave no steps for the budget to fall in a {total_steps}-step run"
        )
    return tinit, tfinal, delta_t


def build_trainable_model(model: nn.Module, config: TrainConfig, total_steps: int, fresh: set[str]) -> nn.Module:
    """Wrap `model` with the method's adapter (peft), or leave it whole for full fine-tuning."""
    if config.method == "full":
        model.requires_grad_(True)
        return model
    from peft import AdaLoraConfig, LoraConfig, TaskType, get_peft_model

    suffixes = target_module_suffixes(model.config.model_type, config.target_modules)
    targets, trained_in_full = plan_adapter_modules(model, suffixes, fresh)
    common = dict(
        task_type=TaskType.SEQ_CLS, target_modules=targets, modules_to_save=trained_in_full,
        lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
    )
    if config.method == "lora":
        peft_config = LoraConfig(r=config.lora_r, **common)
    else:
        tinit, tfinal, delta_t = adalora_phases(config, total_steps)
        peft_config = AdaLoraConfig(
            init_r=config.init_r, target_r=config.target_r, tinit=tinit, tfinal=tfinal, deltaT=delta_t,
            beta1=config.sensitivity_beta1, beta2=config.sensitivity_beta2, orth_reg_weight=config.orth_reg,
            total_step=total_steps, **common,
        )
    return get_peft_model(model, peft_config)


def make_optimizer(model: nn.Module, config: TrainConfig, ess: float, sync: bool = False):
    params = [p for p in model.parameters() if p.requires_grad]
    lr = config.resolved_lr()
    if config.uses_ivon:
        import ivon

        return ivon.IVON(
            params, lr=lr, ess=ess, hess_init=config.ivon_hess_init, beta1=config.ivon_beta1,
            beta2=config.ivon_beta2, weight_decay=config.ivon_weight_decay, mc_samples=config.train_mc_samples,
            clip_radius=config.ivon_clip_radius, sync=sync,
        )
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)


def lr_multiplier(config: TrainConfig, total_steps: int, warmup: int):
    if config.lr_schedule == "two-phase":
        return lambda s: two_phase(s, warmup, config.two_phase_const, config.two_phase_first,
                                   config.two_phase_second, total_steps)
    if config.lr_schedule == "constant":
        return lambda s: constant_warmup(s, warmup)
    return lambda s: linear_warmup_decay(s, warmup, total_steps)


# ---------------------------------------------------------------- steps


def forward_loss(model: nn.Module, batch: dict, autocast) -> torch.Tensor:
    with autocast:
        return model(**batch).loss


def training_step(model: nn.Module, batch: dict, optimizer, config: TrainConfig, autocast) -> float:
    """One optimizer step; IVON averages gradients at `train_mc_samples` posterior samples."""
    if not config.uses_ivon:
        optimizer.zero_grad(set_to_none=True)
        loss = forward_loss(model, batch, autocast)
        loss.backward()
        optimizer.step()
        return loss.item()
    losses = []
    for _ in range(config.train_mc_samples):
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad(set_to_none=True)
            loss = forward_loss(model, batch, autocast)
            loss.backward()
            fill_missing_grads(optimizer)
        losses.append(loss.detach())
    optimizer.step()
    return torch.stack(losses).mean().item()  # one device sync per step


def fill_missing_grads(optimizer) -> None:
    """IVON reads the gradient of every parameter it holds; one the loss did not reach gets zeros."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)


@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) over a loader, at the current weights (IVON: the posterior mean)."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels.append(batch.pop("labels").cpu())
        with autocast:
            logits.append(model(**batch).logits.float().cpu())
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: nn.Module, loaders: dict, spec: TaskSpec, device, autocast) -> dict:
    """Official metrics on every dev split, named as in results.json; for classification also
    calibration and selective prediction (ece, nll, brier, aurc, accuracy_at_coverage)."""
    out = {}
    for split, loader in loaders.items():
        logits, labels = predict(model, loader, device, autocast)
        out.update(predictive_metrics(spec, split, point_predictive(spec, logits.numpy()), labels.numpy()))
    return out


@contextmanager
def posterior_draw(model: nn.Module, sigma: dict[str, torch.Tensor], generator: torch.Generator):
    """The weights named in `sigma` set to one draw mu + sigma * eps of the posterior, mu restored after.

    eps comes from `generator` on the CPU, so a seed gives the same draws on every device. Pruned
    AdaLoRA triplets stay pruned: the noise of a lambda that is exactly 0 in mu is dropped.
    """
    from peft.tuners.adalora import AdaLoraLayer

    lambdas = {id(p) for m in model.modules() if isinstance(m, AdaLoraLayer) for p in m.lora_E.values()}
    means = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in sigma:
                noise = sigma[name].to(p.device, p.dtype) * torch.randn(p.shape, generator=generator).to(p.device, p.dtype)
                if id(p) in lambdas:
                    noise *= p != 0
                means[name] = p.data
                p.data = p.data + noise
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            if name in means:
                p.data = means[name]


def predict_sampled(model: nn.Module, loaders: dict, device, autocast, sigma: dict[str, torch.Tensor],
                    samples: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per split, (logits of each posterior draw (K, N, C), labels): K draws, each predicting every split."""
    generator = torch.Generator().manual_seed(seed)
    draws: dict[str, list] = {split: [] for split in loaders}
    labels = {}
    for _ in range(samples):
        with posterior_draw(model, sigma, generator):
            for split, loader in loaders.items():
                logits, labels[split] = predict(model, loader, device, autocast)
                draws[split].append(logits)
    return {split: (torch.stack(draws[split]), labels[split]) for split in loaders}


def evaluate_sampled(model: nn.Module, loaders: dict, spec: TaskSpec, device, autocast,
                     sigma: dict[str, torch.Tensor], samples: int, seed: int) -> dict:
    """`evaluate`'s metrics of the posterior predictive over `samples` draws, and "samples": K."""
    out = {}
    for split, (draws, labels) in predict_sampled(model, loaders, device, autocast, sigma, samples, seed).items():
        out.update(predictive_metrics(spec, split, mc_predictive(spec, draws.numpy()), labels.numpy()))
    return {**out, "samples": samples}


def named_posterior_sigma(model: nn.Module, optimizer) -> dict[str, torch.Tensor]:
    """IVON's posterior sigma of every trained parameter, keyed by its name in `model` (as in posterior.safetensors)."""
    names = {p: n for n, p in model.named_parameters()}
    return {names[p]: s for p, s in posterior_sigma(optimizer).items()}


# ---------------------------------------------------------------- results


def adapter_ranks(model: nn.Module, config: TrainConfig) -> dict[str, int]:
    """Rank per adapted matrix: AdaLoRA's unmasked triplets, or LoRA's r."""
    if config.method == "full":
        return {}
    from peft.tuners.adalora import AdaLoraLayer
    from peft.tuners.lora import LoraLayer

    ranks = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, AdaLoraLayer):
            ranks[name] = int((module.lora_E["default"] != 0).sum())
        elif isinstance(module, LoraLayer):
            ranks[name] = int(module.r["default"])
    return ranks


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_outputs(out: Path, write) -> None:
    """Write into a fresh sibling folder, then move each output into `out` (where checkpoints may
    already be): a failed run leaves no half-written output behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if not out.exists():
            tmp.rename(out)
            return
        for name in (*RUN_MARKERS, *RUN_FILES):  # a run being overwritten is replaced, not merged into
            old = out / name
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
        for item in tmp.iterdir():
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _kept(out: Path, first_bad: int, procs: Processes) -> str:
    """Drop the checkpoints from step `first_bad` on and name the last good one.

    The loss of step s is computed at the weights of step s - 1, so a loss that diverges at step s
    condemns checkpoint s - 1 too.
    """
    if procs.is_main:
        for path in checkpoint_dirs(out):
            if int(path.name.split("-")[1]) >= first_bad:
                shutil.rmtree(path, ignore_errors=True)
    found = checkpoint_dirs(out)
    return f"; the last good checkpoint is {found[-1]}" if found else "; no good checkpoint is left"


def write_plots(folder: Path) -> None:
    """The run's PNGs (`plots.plot_run`); a plotting failure is reported, and costs the run nothing."""
    import sys

    from .plots import plot_run

    try:
        plot_run(folder)
    except Exception as exc:  # noqa: BLE001 - a figure is not worth a finished run
        print(f"bayes-adalora: warning: the plots were not written ({type(exc).__name__}: {exc})", file=sys.stderr)


def _score(value: float) -> float:
    """For comparing evaluations: an undefined metric (NaN, e.g. Pearson of constant predictions) ranks last."""
    return -math.inf if math.isnan(value) else value


def _finite_or_none(obj):
    """NaN and inf become null, so the files stay strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


def _json_dump(obj, path: Path) -> None:
    path.write_text(json.dumps(_finite_or_none(obj), indent=2, allow_nan=False) + "\n")


# ---------------------------------------------------------------- the run


def train(config: TrainConfig) -> dict:
    """Fine-tune on a GLUE task as `config` says; writes the run to `config.output_dir`, returns results."""
    from transformers import set_seed

    spec = get_task(config.task)
    out = Path(config.output_dir)
    check_output_dir(out, config.overwrite, config.resume)
    resume_from = resume_checkpoint(out, config.resume)
    device = resolve_device(config.device)
    procs = Processes.start(device, config.batch_size)
    device = procs.device or device

    data = load_task_data(
        spec, data_dir=config.data_dir or os.environ.get("GLUE_DIR") or None, train_file=config.train_file,
        validation_file=config.validation_file, text_columns=config.text_columns, label_column=config.label_column,
    )
    if config.max_train_samples:
        data.train.texts, data.train.labels = data.train.texts[: config.max_train_samples], data.train.labels[: config.max_train_samples]
    for ds in data.dev.values():
        if config.max_eval_samples:
            ds.texts, ds.labels = ds.texts[: config.max_eval_samples], ds.labels[: config.max_eval_samples]

    set_seed(config.seed)
    model_name = config.model or default_model_path()
    tokenizer, model, fresh = load_model(model_name, spec, config.trust_remote_code)
    train_loader = make_loader(encode(data.train, tokenizer, config.max_length), tokenizer, config.batch_size, True,
                               config.seed, min_last=procs.world)  # an empty shard's loss would be NaN
    dev_loaders = {
        split: make_loader(encode(ds, tokenizer, config.max_length), tokenizer, config.eval_batch_size, False, config.seed)
        for split, ds in data.dev.items()
    }
    total_steps = total_steps_for(config, len(train_loader))
    warmup = config.warmup_steps if config.warmup_steps is not None else int(0.06 * total_steps)
    eval_steps = config.eval_steps or max(1, total_steps // 10)
    ess = config.ivon_ess or float(len(data.train))

    model = build_trainable_model(model, config, total_steps, fresh).to(device)
    forward_model = procs.wrap(model)  # DDP under accelerate; peft's allocator works on `model`
    model.train()
    optimizer = make_optimizer(model, config, ess, sync=procs.world > 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config, total_steps, warmup))
    tuner = model.base_model if config.uses_adalora else None
    if config.method == "bayes-adalora":
        install_posterior_allocator(model, optimizer, config.criterion, config.logs_correlations)
    elif config.logs_correlations:
        install_correlation_logger(model, optimizer)
    if config.fast_path:  # issue 11: peft's AdaLoRA and ivon-opt, fewer kernels, the same numbers
        enable_fast_path(model, optimizer)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if config.bf16 else nullcontext()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    from tqdm.auto import tqdm

    history = {"loss": [], "lr": [], "budget": [], "eval": []}
    best: dict = {}
    final: dict = {}
    train_seconds = 0.0
    step = 0
    skip = 0  # batches of the current epoch already trained (resume)
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, scheduler, tuner)
        step, history, best, final = state["step"], state["history"], state["best"], state["final"]
        train_seconds, skip = state["train_seconds"], state["batch_in_epoch"]
        train_loader.generator.set_state(state["loader_generator"])
        lr = config.resolved_lr()
        if any(base != lr for base in scheduler.base_lrs):  # e.g. resuming a diverged run with a lower --lr
            scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
            for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
                group["lr"] = lr * factor(scheduler.last_epoch)
    elif (out / CHECKPOINTS).is_dir() and procs.is_main:
        shutil.rmtree(out / CHECKPOINTS)  # --overwrite (checked above): the old run's checkpoints go
    if config.logs_correlations:  # kept in the history, so that a resumed run goes on with it
        tuner.rankallocator.correlation_log = history.setdefault("correlations", [])
    bar = tqdm(total=total_steps, initial=step, disable=not (config.progress and procs.is_main), desc=f"{config.method} {spec.name}", dynamic_ncols=True)
    while step < total_steps:
        epoch_start = train_loader.generator.get_state()  # the epoch's order is drawn from it
        for index, batch in enumerate(train_loader):
            if index < skip:
                continue
            t0 = time.perf_counter()
            batch = {k: v.to(device) for k, v in procs.shard(batch).items()}
            loss = procs.mean(training_step(forward_model, batch, optimizer, config, autocast))  # the batch's loss
            step += 1
            if tuner is not None:
                tuner.update_and_allocate(step)
            scheduler.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds += time.perf_counter() - t0
            if not math.isfinite(loss):
                raise TrainingDiverged(f"training diverged at step {step}: the loss is {loss}; lower --lr{_kept(out, step - 1, procs)}")
            first = history["loss"][0] if history["loss"] else loss
            if config.divergence_factor and loss > config.divergence_factor * first:
                raise TrainingDiverged(
                    f"training diverged at step {step}: the loss {loss:.4g} is over {config.divergence_factor:g} times "
                    f"the first step's {first:.4g}; lower --lr{_kept(out, step - 1, procs)}"
                )

            budget = tuner.rankallocator.budget_schedule(step)[0] if tuner is not None else None
            lr_now = optimizer.param_groups[0]["lr"]
            history["loss"].append(loss)
            history["lr"].append(lr_now)
            history["budget"].append(budget)
            bar.update(1)
            if step % 10 == 0 or step == total_steps:
                postfix = {"loss": f"{loss:.4f}", "lr": f"{lr_now:.3g}"}
                if budget is not None:
                    postfix["rank budget"] = budget
                bar.set_postfix(postfix)

            end_of_epoch = index == len(train_loader) - 1
            if step % eval_steps == 0 or step == total_steps or end_of_epoch:
                final = evaluate(model, dev_loaders, spec, device, autocast)
                history["eval"].append({"step": step, **final})
                if not best or _score(final[spec.main_metric_name]) > _score(best[spec.main_metric_name]):
                    best = {**final, "step": step}
            if config.save_steps and step % config.save_steps == 0 and step < total_steps:
                # every process checks (they hold the same weights), so all stop together
                if not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
                    raise TrainingDiverged(f"training diverged at step {step}: the weights are no longer finite; lower --lr{_kept(out, step, procs)}")
                extra = {"history": history, "best": best, "final": final, "train_seconds": train_seconds,
                         "loader_generator": epoch_start, "batch_in_epoch": index + 1}
                # (at an epoch's last batch the sampler has yet to draw once more from the generator,
                # so the next epoch's start is not known here: a resume replays this epoch's order)
                if procs.is_main:
                    save_checkpoint(out, step, model, optimizer, scheduler, tuner, extra, config.save_total_limit)
                procs.wait()
            if step >= total_steps:
                break
        skip = 0
    bar.close()
    mc = {}
    if config.mc_samples:  # once, at the end: K passes over the dev data
        mc = evaluate_sampled(model, dev_loaders, spec, device, autocast, named_posterior_sigma(model, optimizer),
                              config.mc_samples, config.seed)

    ranks = adapter_ranks(model, config)
    if not procs.same_everywhere(ranks):  # every process must have masked the same triplets
        raise RuntimeError("the processes ended with different rank patterns; please report this as a bug")
    results = {
        "task": spec.name,
        "method": config.method,
        "criterion": config.criterion if config.method == "bayes-adalora" else None,
        "model": model_name,
        "seed": config.seed,
        "steps": total_steps,
        "metrics": {"final": final, "best": best, **({"mc": mc} if mc else {})},
        "main_metric": spec.main_metric_name,
        "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / total_steps,
        "peak_memory_mb": peak_memory_mb(device),
        "trainable_parameters": trainable,
        "final_ranks": ranks,
        "total_rank": sum(ranks.values()),
        "train_examples": len(data.train),
        "device": str(device),
        "processes": procs.world,
    }
    resolved = {
        **config.to_dict(), "model": model_name, "data_dir": config.data_dir or os.environ.get("GLUE_DIR") or None, "lr": config.resolved_lr(), "total_steps": total_steps,
        "warmup_steps": warmup, "eval_steps": eval_steps, "ivon_ess": ess if config.uses_ivon else None,
        "num_labels": spec.num_labels,
    }
    if config.uses_adalora:
        peft_cfg = tuner.peft_config["default"]
        resolved.update(tinit=peft_cfg.tinit, tfinal=peft_cfg.tfinal, delta_t=peft_cfg.deltaT)

    def write(folder: Path) -> None:
        if config.method == "full":
            model.save_pretrained(folder / "model")
            tokenizer.save_pretrained(folder / "model")
        else:
            model.save_pretrained(folder / "adapter")
        if config.uses_ivon:
            from safetensors.torch import save_file

            names = {p: n for n, p in model.named_parameters()}
            tensors, meta = posterior_state_dict(optimizer, names)
            save_file(tensors, folder / "posterior.safetensors", metadata=meta)
        _json_dump(resolved, folder / "config.json")
        _json_dump({k: v for k, v in history.items() if k != "correlations"}, folder / "history.json")
        _json_dump(results, folder / "results.json")
        if config.logs_correlations:
            _json_dump({"sensitivity": tuner.rankallocator.sensitivity_kind, "triplets": tuner.rankallocator.init_bgt,
                        "steps": history["correlations"]}, folder / "correlations.json")
        if config.plots:
            write_plots(folder)

    if procs.is_main:
        write_outputs(out, write)
    procs.wait()
    return results
