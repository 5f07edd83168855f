"""A run folder's files: which they are, how they are written (all at once, or nothing), and how a
finished run is read back (`SavedRun`). No model and no data here."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import POSTERIOR_FILE, read_posterior
from .checkpoint import CHECKPOINTS
from .config import TrainConfig, config_fields
from .errors import UserError
from .tasks import TaskSpec, get_task, is_data_task

RUN_MARKERS = ("results.json", "config.json")
RUN_FILES = ("adapter", "model", POSTERIOR_FILE, "history.json", "correlations.json",
             "ranks.png", "training.png", "sigma.png", "correlations.png")  # --overwrite replaces them all
TRACKER_DIR = "tensorboard"  # --report-to tensorboard writes here while the run goes (kept by a resume)


# ----------------------------------------------------------------------------- writing


def check_writable(path: Path) -> None:
    """Refuse a folder that cannot be made or written to: under a file, read-only, or not permitted.

    Tried by making (and removing) a temporary folder where the run's files will go: in `path` if it
    exists, else in its nearest existing parent, and beside it, where the outputs are first written.
    """
    for target in (path, path.parent):
        existing = next(p for p in (target, *target.parents) if p.exists() or p == p.parent)
        if not existing.is_dir():
            raise UserError(f"--output-dir {path} lies under {existing}, which is a file, not a folder")
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".bayes-adalora-probe-", dir=existing))
        except OSError as err:
            raise UserError(f"--output-dir {path} cannot be written: {existing} refuses new files "
                            f"({err.strerror or err}); choose another folder") from None


def check_output_dir(path: Path, overwrite: bool, resume: str | None = None) -> None:
    """Refuse, before any work, an output folder that cannot be written or holds something a run must
    not replace."""
    if path.exists() and not path.is_dir():
        raise UserError(f"--output-dir {path} is a file, not a folder")
    check_writable(path)
    if not path.is_dir():
        return
    holds_run = any((path / m).exists() for m in RUN_MARKERS)
    holds_checkpoints = (path / CHECKPOINTS).is_dir()
    if holds_run and not overwrite:
        raise UserError(f"{path} already holds a run: pass --overwrite to replace it, or choose another --output-dir")
    if holds_checkpoints and not holds_run and not (overwrite or resume):
        raise UserError(f"{path} holds an unfinished run: pass --resume to continue it, or --overwrite to start again")
    # refused up front, not after training; and --overwrite only ever deletes a run, never other files
    others = [p for p in path.iterdir() if p.name not in (*RUN_MARKERS, CHECKPOINTS, TRACKER_DIR, *RUN_FILES)]
    if not holds_run and not holds_checkpoints and others:
        raise UserError(f"--output-dir {path} holds files that are not a run: choose a new or empty folder")


def finite_or_none(obj):
    """NaN and inf become null, so the files stay strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_or_none(v) for v in obj]
    return obj


def write_json(obj, path: Path) -> None:
    path.write_text(json.dumps(finite_or_none(obj), indent=2, allow_nan=False) + "\n")


def write_outputs(out: Path, write) -> None:
    """Call `write(folder)` on a fresh sibling folder, then move each output into `out` (where
    checkpoints may already be): a failed run leaves no half-written output behind."""
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
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
    except OSError as err:  # e.g. a full disk: the run is lost, but no half-written folder stays
        raise UserError(f"the run could not be written to {out} ({err.strerror or err}): "
                        f"free space or choose another --output-dir, and train again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- reading


@dataclass
class SavedRun:
    """The files of a finished run (`train` wrote them)."""

    folder: Path
    resolved: dict  # config.json: the full resolved configuration
    results: dict

    @property
    def config(self) -> TrainConfig:
        names = {f.name for f in config_fields()}
        try:
            return TrainConfig(**{k: v for k, v in self.resolved.items() if k in names})
        except UserError as err:
            raise UserError(f"{self.folder / 'config.json'} does not hold a valid configuration: {err}") from None

    @property
    def spec(self) -> TaskSpec:
        """The run's task; classification on the user's own data with the classes config.json names."""
        if is_data_task(self.resolved["task"]) and self.resolved["task"] != "regression":
            self.require("labels")
        return get_task(self.resolved["task"], self.resolved.get("labels"))

    @property
    def method(self) -> str:
        return self.resolved["method"]

    def require(self, *keys: str) -> None:
        """Refuse a config.json that lacks what the caller reads from it."""
        lacking = [k for k in keys if k not in self.resolved]
        if lacking:
            raise UserError(f"{self.folder / 'config.json'} is not a run's config.json: it has no {lacking[0]!r}")

    def json(self, name: str) -> dict | None:
        """One of the run's JSON files (history.json, correlations.json), None where the run has none."""
        path = self.folder / name
        return json.loads(path.read_text()) if path.is_file() else None

    def posterior(self, kind: str) -> dict[str, torch.Tensor] | None:
        """posterior.safetensors' `<name>.<kind>` tensors (kind: mean, hess, sigma) by parameter name, or None."""
        path = self.folder / POSTERIOR_FILE
        return read_posterior(path, kind) if path.is_file() else None


def read_run(folder: str | Path) -> SavedRun:
    """The run in `folder`, refusing anything that is not a finished run."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"the run folder {folder} does not exist")
    files = {}
    for name in ("config.json", "results.json"):
        path = folder / name
        if not path.is_file():
            raise UserError(f"{folder} is not a finished run: it has no {name}")
        try:
            files[name] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}, line {err.lineno}: the JSON is malformed ({err.msg})") from None
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text: it is not a run's {name}") from None
        if not isinstance(files[name], dict):
            raise UserError(f"{path} holds a JSON {type(files[name]).__name__}, not the object a run's {name} is")
    run = SavedRun(folder, files["config.json"], files["results.json"])
    run.require("task", "method")
    run.config  # noqa: B018 - refused here, in one sentence, if config.json does not hold a valid configuration
    return run
