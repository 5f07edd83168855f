"""Checkpoints for exact resume: everything a run's next step depends on, written atomically.

Weights go to safetensors; the rest (optimizer, scheduler, allocator EMAs, RNG states, data
position, history) to a torch file read back with `weights_only=True`. Beyond the usual
`state_dict`s this keeps what peft and ivon-opt do not save themselves: IVON's `current_step`
(its momentum debiasing), peft's RankAllocator EMAs (`ipt`, `exp_avg_ipt`, `exp_avg_unc`) and the
AdaLoRA `rank_pattern`, the data loader's generator as of the current epoch's start plus the batch
index within it, and the CPU RNG states of torch, Python and NumPy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import UserError

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints under `output_dir`, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "state.pt").exists()
    ]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint folder `step-NNNNNNN`."""
    return int(_STEP_DIR.match(path.name).group(1))


def drop_checkpoints_from(output_dir: Path, first_bad: int) -> list[Path]:
    """Delete the checkpoints of step `first_bad` and later (a diverged run's); returns those left."""
    for path in checkpoint_dirs(output_dir):
        if checkpoint_step(path) >= first_bad:
            shutil.rmtree(path, ignore_errors=True)
    return checkpoint_dirs(output_dir)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():  # a machine with fewer GPUs takes the first ones' states
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def allocator_state(tuner) -> dict:
    """peft's AdaLoRA allocator state and rank pattern (None where the method has no allocator)."""
    if tuner is None:
        return {}
    alloc = tuner.rankallocator
    config = tuner.peft_config[tuner.trainable_adapter_name]
    return {
        "ipt": dict(alloc.ipt), "exp_avg_ipt": dict(alloc.exp_avg_ipt), "exp_avg_unc": dict(alloc.exp_avg_unc),
        "rank_pattern": config.rank_pattern,
    }


def load_allocator_state(tuner, state: dict) -> None:
    """Restore peft's allocator EMAs (each onto its parameter's device: a checkpoint is read onto the CPU)
    and the rank pattern."""
    if tuner is None or not state:
        return
    alloc = tuner.rankallocator
    devices = {n: p.device for n, p in tuner.model.named_parameters()}
    alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = (
        {n: t.to(devices.get(n, t.device)) for n, t in state[key].items()}
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"))
    tuner.peft_config[tuner.trainable_adapter_name].rank_pattern = state["rank_pattern"]


def place_ivon_state(optimizer) -> None:
    """Move IVON's Hessian and momentum, which it keeps in the param groups, onto the groups' parameters'
    device: `Optimizer.load_state_dict` moves the per-parameter state but leaves the groups' tensors where
    the file had them (the CPU, for a checkpoint read with `map_location="cpu"` or by the Trainer)."""
    for group in optimizer.param_groups:
        device = next((p.device for p in group["params"] if p is not None), None)
        for key in ("hess", "momentum"):
            if device is not None and isinstance(group.get(key), torch.Tensor):
                group[key] = group[key].to(device)


def save_checkpoint(output_dir: Path, step: int, model, optimizer, scheduler, tuner, extra: dict, keep: int) -> Path:
    """Write checkpoint `step` (write into a temporary folder, then rename) and keep the last `keep`."""
    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), tmp / "weights.safetensors")
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "ivon_current_step": getattr(optimizer, "current_step", None),
        "scheduler": scheduler.state_dict(),
        "allocator": allocator_state(tuner),
        "rng": rng_state(),
        **extra,
    }
    torch.save(state, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, state) of a checkpoint folder, refusing a damaged file in one sentence that names it."""

    def damaged(name: str) -> UserError:
        return UserError(f"the checkpoint {path} is damaged ({name} cannot be read): resume from an earlier one "
                         f"with --resume PATH, or start again with --overwrite")

    try:
        weights = load_file(path / "weights.safetensors")
    except (SafetensorError, OSError):
        raise damaged("weights.safetensors") from None
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)  # a GPU run's, on any machine
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError):
        raise damaged("state.pt") from None
    if not isinstance(state, dict) or not {"step", "optimizer", "scheduler", "rng"} <= set(state):
        raise damaged("state.pt")
    return weights, state


# the settings (config.json's keys) a resumed run may change: where it runs and where its model and data
# are read from (their contents are the user's to keep: the checkpoint holds the trained weights only);
# how it is evaluated, saved, logged or shown; and --lr (a diverged run is resumed with a lower one).
# Any other difference would change the run half-way (its schedules, its optimizer, its data size),
# so it is refused; the step count is compared first, as a change in the data's size shows there.
MAY_CHANGE_ON_RESUME = frozenset({
    "model", "data_dir", "train_file", "validation_file", "trust_remote_code", "device", "bf16", "fast_path",
    "lr", "eval_steps", "max_eval_samples", "eval_batch_size", "mc_samples",
    "log_correlations", "plots", "report_to", "progress", "output_dir", "divergence_factor", "save_steps",
    "save_total_limit", "resume", "overwrite", "recipe", "derived",
})
PLAN_ONLY = {"total_steps": "the step count", "num_labels": "the number of classes", "labels": "the classes"}


def check_same_settings(path: Path, saved: dict | None, now: dict) -> None:
    """Refuse to resume a checkpoint whose run was planned with other settings (`saved`, config.json's
    form, kept in the checkpoint) than this run (`now`), naming the first that differs."""
    if saved is None:  # a checkpoint written before the settings were kept in it
        return
    for name in sorted(now, key=lambda n: n != "total_steps"):
        value = now[name]
        if name in MAY_CHANGE_ON_RESUME or name not in saved or saved[name] == value:
            continue
        what = PLAN_ONLY.get(name, "--" + name.replace("_", "-"))
        raise UserError(
            f"the checkpoint {path} was trained with other settings ({what} {saved[name]!r} there, {value!r} "
            f"here): resume with the checkpoint's settings (only --lr, the device, where the model and data are "
            f"read from, and how the run is evaluated, saved, logged or shown may change), or start again with "
            f"--overwrite")


def data_fingerprint(dataset) -> dict | None:
    """A training set's example count and a SHA-256 of its contents (texts, labels, prompts, choices: every
    field but `source`, where it was read from), kept in checkpoints so that a resume on other data is
    refused; None for a dataset that is not one of this package's dataclasses."""
    if not dataclasses.is_dataclass(dataset):
        return None
    digest = hashlib.sha256()
    for field in dataclasses.fields(dataset):
        if field.name == "source":
            continue
        digest.update(field.name.encode() + b"\x01")
        for item in getattr(dataset, field.name):
            digest.update(repr(item).encode() + b"\x00")
    return {"examples": len(dataset), "sha256": digest.hexdigest()}


def check_same_data(path: Path, saved: dict | None, now: dict | None) -> None:
    """Refuse to resume a checkpoint trained on other training data (another epoch order, other examples)."""
    if saved is None or now is None or saved == now:  # a checkpoint from before the data were kept in it
        return
    counts = (f"{saved['examples']} examples there, {now['examples']} here" if saved["examples"] != now["examples"]
              else f"{now['examples']} examples in both, with other contents")
    raise UserError(f"the checkpoint {path} was trained on other training data ({counts}): resume with the data it "
                    f"was trained on, or start again with --overwrite")


def checkpoint_settings(path: Path) -> dict | None:
    """The settings a checkpoint's run was planned with (None: not a readable checkpoint, or one from before
    they were kept); memory-mapped, so the optimizer state it also holds is not read."""
    try:
        state = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError):
        return None  # load_checkpoint says what is wrong with it
    return state.get("settings") if isinstance(state, dict) else None


def load_checkpoint(path: Path, model, optimizer, scheduler, tuner, settings: dict | None = None,
                    train_data: dict | None = None) -> dict:
    """Restore a checkpoint into the run's objects; returns the state (step, loader position, extras).
    `settings`: this run's config.json, refused where it differs from the checkpoint's run; `train_data`:
    this run's `data_fingerprint`, refused where it differs from the checkpoint's."""
    path = Path(path)
    if not (path / "state.pt").exists() or not (path / "weights.safetensors").exists():
        raise UserError(f"{path} is not a complete checkpoint (weights.safetensors and state.pt are needed)")
    weights, state = read_checkpoint(path)
    # the data first: another training set changes what the run derives from its size (IVON's ess, the
    # step count of --epochs), and the message must name the data, not the setting derived from it
    check_same_data(path, state.get("train_data"), train_data)
    if settings is not None:
        check_same_settings(path, state.get("settings"), settings)
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [n for n in weights if n not in params]
    if missing or unknown:
        raise UserError(f"the checkpoint {path} does not match this run: it {'lacks' if missing else 'has'} "
                        f"{(missing or unknown)[0]}; resume with the settings it was trained with")
    for name, tensor in weights.items():
        if tensor.shape != params[name].shape:
            raise UserError(
                f"the checkpoint {path} was trained with other settings: {name} has shape {tuple(tensor.shape)} "
                f"there and {tuple(params[name].shape)} here (a setting that shapes the adapter, such as --init-r, "
                f"--lora-r, --target-modules or --model, differs): resume with the checkpoint's settings")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    if state.get("ivon_current_step") is not None:
        optimizer.current_step = state["ivon_current_step"]
        place_ivon_state(optimizer)
    scheduler.load_state_dict(state["scheduler"])
    load_allocator_state(tuner, state["allocator"])
    set_rng_state(state["rng"])
    return state
