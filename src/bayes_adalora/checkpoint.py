"""What a run adds to the Trainer's checkpoints, and how a resume is checked.

The Trainer keeps the weights, optimizer, scheduler, RNG states and the data position in
`checkpoints/checkpoint-N/`; `trainer_checkpoints.AdaLoraCheckpoints` adds what peft and ivon-opt do not save
themselves (peft's allocator EMAs and rank pattern, IVON's `current_step` and its noise stream). The run
adds `bayes-adalora-state.json` (its history, best and final evaluations, training time, the settings it
was planned with and its training data's fingerprint), written last and at once: a checkpoint is complete
once it holds that file. A resume with other settings or other training data is refused, naming the first
difference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .adapters import rank_allocator, rank_pattern, set_rank_pattern
from .config import current_names
from .errors import UserError
from .paths import atomic_file
from .sharding import gather_rows, is_sharded, local_shard, shard_rows

CHECKPOINTS = "checkpoints"
RUN_STATE = "bayes-adalora-state.json"
_STEP_DIR = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints under `output_dir`, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / RUN_STATE).exists()
    ]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint folder `checkpoint-N` (the Trainer's name)."""
    return int(_STEP_DIR.match(path.name).group(1))


def drop_checkpoints_from(output_dir: Path, first_bad: int) -> list[Path]:
    """Delete the checkpoints of step `first_bad` and later (a diverged run's); returns those left."""
    for path in checkpoint_dirs(output_dir):
        if checkpoint_step(path) >= first_bad:
            shutil.rmtree(path, ignore_errors=True)
    return checkpoint_dirs(output_dir)


EMAS = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # peft's allocator's sensitivity tensors, keyed by parameter name


def allocator_state(tuner) -> dict:
    """peft's AdaLoRA allocator state and rank pattern (None where the method has no allocator). Of a model FSDP
    sharded, the EMAs (each process's rows) are gathered whole: every process must call it then."""
    if tuner is None:
        return {}
    alloc = rank_allocator(tuner)
    params = dict(tuner.model.named_parameters())
    return {
        **{key: {n: gather_rows(params[n], t) if n in params else t for n, t in getattr(alloc, key).items()}
           for key in EMAS},
        "rank_pattern": rank_pattern(tuner),
    }


def load_allocator_state(tuner, state: dict) -> None:
    """Restore peft's allocator EMAs (each onto its parameter's device: a checkpoint is read onto the CPU; of a
    parameter FSDP sharded, this process's rows) and the rank pattern."""
    if tuner is None or not state:
        return
    alloc = rank_allocator(tuner)
    params = dict(tuner.model.named_parameters())

    def placed(n: str, t: torch.Tensor) -> torch.Tensor:
        if n not in params:
            return t
        if not is_sharded(params[n]):
            return t.to(params[n].device)
        start, stop = shard_rows(params[n])
        return t[start:stop].to(local_shard(params[n]).device).clone()  # a copy: the whole is not kept alive

    alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = (
        {n: placed(n, t) for n, t in state[key].items()} for key in EMAS)
    set_rank_pattern(tuner, state["rank_pattern"])


def place_ivon_state(optimizer) -> None:
    """Move IVON's Hessian and momentum, which it keeps in the param groups, onto the groups' parameters'
    device: `Optimizer.load_state_dict` moves the per-parameter state but leaves the groups' tensors where
    the file had them (the CPU, for a checkpoint read with `map_location="cpu"` or by the Trainer)."""
    for group in optimizer.param_groups:
        device = next((p.device for p in group["params"] if p is not None), None)
        for key in ("hess", "momentum"):
            if device is not None and isinstance(group.get(key), torch.Tensor):
                group[key] = group[key].to(device)


def write_run_state(folder: Path, state: dict) -> None:
    """The run's own part of a Trainer checkpoint, written last and at once: a checkpoint is complete once
    it has this file (the Trainer writes its files in place, so a run killed while saving leaves one without)."""
    with atomic_file(Path(folder) / RUN_STATE) as tmp:
        tmp.write_text(json.dumps(state) + "\n", encoding="utf-8")  # floats exact (repr), NaN kept as NaN


def read_run_state(path: Path) -> dict:
    """The run state of checkpoint `path`, refusing a damaged file in one sentence that names it."""
    try:
        state = json.loads((Path(path) / RUN_STATE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise damaged_checkpoint(path, RUN_STATE) from None
    if not isinstance(state, dict) or not {"step", "history", "settings"} <= set(state):
        raise damaged_checkpoint(path, RUN_STATE)
    return state


def damaged_checkpoint(path: Path, name: str) -> UserError:
    return UserError(f"the checkpoint {path} is damaged ({name} cannot be read): resume from an earlier one "
                     f"with --resume-from-checkpoint PATH, or start again with --overwrite")


def check_checkpoint_files(path: Path) -> None:
    """Read every file of a Trainer checkpoint that a resume reads, as the Trainer reads it, so that a damaged
    one is refused in one sentence before training starts (not as a traceback from inside the Trainer)."""
    from transformers.trainer_pt_utils import safe_globals  # the NumPy types of the Trainer's RNG states

    for file in sorted(Path(path).iterdir()):
        try:
            if file.suffix == ".safetensors":
                load_file(file)
            elif file.suffix in (".pt", ".pth"):
                with safe_globals():
                    torch.load(file, map_location="cpu", weights_only=True)
            elif file.suffix == ".json":
                json.loads(file.read_text(encoding="utf-8"))
        except (SafetensorError, RuntimeError, OSError, EOFError, pickle.UnpicklingError, UnicodeDecodeError,
                json.JSONDecodeError):
            raise damaged_checkpoint(path, file.name) from None


# the settings (config.json's keys) a resumed run may change: where it runs and where its model and data
# are read from (their contents are the user's to keep: the checkpoint holds the trained weights only);
# how it is evaluated, saved, logged or shown; and --learning-rate (a diverged run is resumed with a lower one).
# Any other difference would change the run half-way (its schedules, its optimizer, its data size),
# so it is refused; the step count is compared first, as a change in the data's size shows there.
MAY_CHANGE_ON_RESUME = frozenset({
    "model", "data_dir", "train_file", "validation_file", "trust_remote_code", "device", "bf16", "fast_path",
    "gradient_checkpointing",
    "learning_rate", "eval_steps", "max_eval_samples", "per_device_eval_batch_size", "mc_samples", "logging_steps",
    "per_device_train_batch_size",
    "log_correlations", "plots", "report_to", "progress", "output_dir", "divergence_factor", "save_steps",
    "save_total_limit", "resume_from_checkpoint", "overwrite", "recipe", "derived",
})
PLAN_ONLY = {"total_steps": "the step count", "num_labels": "the number of classes", "labels": "the classes"}


def check_same_settings(path: Path, saved: dict | None, now: dict) -> None:
    """Refuse to resume a checkpoint whose run was planned with other settings (`saved`, config.json's
    form, kept in the checkpoint) than this run (`now`), naming the first that differs."""
    if saved is None:  # a checkpoint written before the settings were kept in it
        return
    saved = current_names(saved)
    for name in sorted(now, key=lambda n: n != "total_steps"):
        value = now[name]
        if name in MAY_CHANGE_ON_RESUME or name not in saved or saved[name] == value:
            continue
        what = PLAN_ONLY.get(name, "--" + name.replace("_", "-"))
        raise UserError(
            f"the checkpoint {path} was trained with other settings ({what} {saved[name]!r} there, {value!r} "
            f"here): resume with the checkpoint's settings (only --learning-rate, the device, where the model and "
            f"data are read from, and how the run is evaluated, saved, logged or shown may change), or start again "
            f"with --overwrite")


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
    """The settings a checkpoint's run was planned with (None: not a readable checkpoint)."""
    try:
        return current_names(read_run_state(path)["settings"])
    except UserError:
        return None  # the resume says what is wrong with it
