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
from .config import TrainConfig, config_fields, current_names
from .errors import UserError
from .paths import FOLDER, exists_at_all, partial_path, path_kind, require_folder
from .tasks import TaskSpec, get_task, is_data_task

RUN_MARKER = "bayes-adalora.json"  # {"written_by": "bayes-adalora", "kind": "run" | "export" | "figures"}
RUN_FILES = ("results.json", "config.json", "adapter", "model", POSTERIOR_FILE, "history.json", "correlations.json",
             "ranks.png", "training.png", "sigma.png", "correlations.png")  # --overwrite replaces them all
EXPORTS = ("export", "merged")  # `export`'s default folders inside a run: an --overwrite of the run removes them
EXPORT_CARD_LINE = "Trained with (reconstructed from the run's config.json):"  # in every export's README.md
TRACKER_DIR = "tensorboard"  # --report-to tensorboard writes here while the run goes (kept by a resume)
EXPORT_RUN_FILE = "training_run.json"  # in an exported adapter: the run's config.json and results.json, as one object


# ----------------------------------------------------------------------------- what is ours


def read_json_object(path: Path) -> dict | None:
    """The JSON object in `path`, or None where there is none (no file, not JSON, not an object)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def folder_kind(folder: Path) -> str | None:
    """What bayes-adalora wrote `folder` as: "run", "export" or "figures"; None where it is not ours.

    Our marker says so; a run written before the marker existed is known by its config.json (the
    resolved settings: task, method and the plan's total_steps), an export by its model card. A
    folder holding some other config.json (a transformers model's) is not a run.
    """
    if not folder.is_dir():
        return None
    marker = read_json_object(folder / RUN_MARKER)
    if marker is not None and marker.get("written_by") == "bayes-adalora":
        return marker.get("kind")
    config = read_json_object(folder / "config.json")
    if config is not None and {"task", "method", "total_steps"} <= config.keys():
        return "run"
    card = folder / "README.md"
    if card.is_file() and EXPORT_CARD_LINE in card.read_text(errors="replace"):
        return "export"
    return None


def write_marker(folder: Path, kind: str) -> None:
    """Mark `folder` as written by bayes-adalora (what `folder_kind` reads)."""
    (folder / RUN_MARKER).write_text(json.dumps({"written_by": "bayes-adalora", "kind": kind}) + "\n")


def own_files_holding(path: Path) -> tuple[Path, Path] | None:
    """(run folder, its file or folder) where `path` lies inside one of a run's own files or folders
    (its adapter/, model/, checkpoints/, ...), else None: no command writes there."""
    path = Path(os.path.abspath(path))
    for parent in path.parents:
        if folder_kind(parent) == "run" or (parent / CHECKPOINTS).is_dir():
            inside = path.relative_to(parent).parts[0]
            if inside in (*RUN_FILES, CHECKPOINTS, TRACKER_DIR, RUN_MARKER):
                return parent, parent / inside
            return None
    return None


def check_not_in_a_run(path: Path, flag: str) -> None:
    """Refuse an output path inside a run's own files: writing there would change the run."""
    held = own_files_holding(path)
    if held is not None:
        raise UserError(f"{flag} {path} lies inside {held[1]}, part of the run in {held[0]}; "
                        f"choose a folder outside the run's own files")


def check_new_file(path: Path, flag: str) -> None:
    """Refuse, before any work, a file to write where anything already is (nothing is written over), inside a
    run's own files, or where it cannot be made."""
    kind = path_kind(path)
    if exists_at_all(path):
        raise UserError(f"{flag} {path} already exists ({kind}): bayes-adalora writes only new files here; "
                        f"remove it or choose another name")
    check_not_in_a_run(path, flag)
    parent = next((p for p in (path.parent, *path.parent.parents) if exists_at_all(p)), Path("."))
    if path_kind(parent) != FOLDER:
        raise UserError(f"{flag} {path} lies under {parent}, which is {path_kind(parent)}, not a folder")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {path}: {parent} cannot be written to")


# ----------------------------------------------------------------------------- writing


def check_writable(path: Path, flag: str = "--output-dir") -> None:
    """Refuse a folder that cannot be made or written to: under a file, read-only, or not permitted.

    Tried by making (and removing) a temporary folder where the run's files will go: in `path` if it
    exists, else in its nearest existing parent, and beside it, where the outputs are first written.
    """
    for target in (path, path.parent):
        existing = next(p for p in (target, *target.parents) if exists_at_all(p) or p == p.parent)
        if path_kind(existing) != FOLDER:
            raise UserError(f"{flag} {path} lies under {existing}, which is {path_kind(existing)}, not a folder")
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".bayes-adalora-probe-", dir=existing))
        except OSError as err:
            raise UserError(f"{flag} {path} cannot be written: {existing} refuses new files "
                            f"({err.strerror or err}); choose another folder") from None


def check_output_folder(path: Path, flag: str = "--output-dir") -> None:
    """Refuse an output folder that is something else (a file, a FIFO, a symlink loop), lies inside a run's
    own files, or cannot be written."""
    kind = path_kind(path)
    if exists_at_all(path) and kind != FOLDER:
        raise UserError(f"{flag} {path} is {kind}, not a folder")
    check_not_in_a_run(path, flag)
    check_writable(path, flag)


def check_output_dir(path: Path, overwrite: bool, resume: str | None = None) -> None:
    """Refuse, before any work, an output folder that cannot be written or holds something a run must
    not replace: --overwrite replaces a run (known by our marker, `folder_kind`), never anything else."""
    check_output_folder(path)
    if not path.is_dir():
        return
    kind = folder_kind(path)
    holds_run = kind == "run"
    holds_checkpoints = (path / CHECKPOINTS).is_dir()
    if kind in ("export", "figures"):
        raise UserError(f"--output-dir {path} holds a bayes-adalora {kind}, not a run: choose another folder")
    if holds_run and not overwrite:
        raise UserError(f"{path} already holds a run: pass --overwrite to replace it, or choose another --output-dir")
    if holds_checkpoints and not holds_run and not (overwrite or resume):
        raise UserError(f"{path} holds an unfinished run: pass --resume-from-checkpoint to continue it, or --overwrite "
                        f"to start again")
    # refused up front, not after training; and --overwrite only ever deletes a run, never other files
    others = sorted(p.name for p in path.iterdir()
                    if p.name not in (RUN_MARKER, CHECKPOINTS, TRACKER_DIR, *RUN_FILES, *EXPORTS))
    if not holds_run and not holds_checkpoints and (others or any((path / n).exists() for n in RUN_FILES)):
        names = others or [n for n in RUN_FILES if (path / n).exists()]
        raise UserError(f"--output-dir {path} holds files that are not a bayes-adalora run ({', '.join(names[:3])}"
                        f"{', ...' if len(names) > 3 else ''}), which --overwrite never replaces: choose a new or "
                        f"empty folder")


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
    tmp = partial_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        if not out.exists():
            tmp.rename(out)
            return
        stale = [out / n for n in (RUN_MARKER, *RUN_FILES)]
        stale += [out / n for n in EXPORTS if folder_kind(out / n) == "export"]  # an old export's card is wrong now
        for old in stale:  # a run being overwritten is replaced, not merged into
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            elif exists_at_all(old):
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
    """The files of a finished run (`train` wrote them), or of an adapter `export` wrote from one."""

    folder: Path
    resolved: dict  # config.json: the full resolved configuration
    results: dict
    exported: bool = False  # an export folder: the adapter's files sit in `folder` itself

    @property
    def adapter(self) -> Path:
        """The folder of the adapter's files (adapter_config.json, adapter_model.safetensors)."""
        return self.folder if self.exported else self.folder / "adapter"

    @property
    def settings_file(self) -> Path:
        """The file the settings were read from, for refusals to name."""
        return self.folder / (EXPORT_RUN_FILE if self.exported else "config.json")

    @property
    def config(self) -> TrainConfig:
        names = {f.name for f in config_fields()}
        try:
            return TrainConfig(**{k: v for k, v in self.resolved.items() if k in names})
        except UserError as err:
            raise UserError(f"{self.settings_file} does not hold a valid configuration: {err}") from None

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
            raise UserError(f"{self.settings_file} does not hold a run's settings: it has no {lacking[0]!r}")

    def json(self, name: str) -> dict | None:
        """One of the run's JSON files (history.json, correlations.json), None where the run has none."""
        path = self.folder / name
        return read_run_json(path) if path.is_file() else None

    def posterior(self, kind: str) -> dict[str, torch.Tensor] | None:
        """posterior.safetensors' `<name>.<kind>` tensors (kind: mean, hess, sigma) by parameter name, or None."""
        path = self.folder / POSTERIOR_FILE
        return read_posterior(path, kind) if path.is_file() else None


def read_run_json(path: Path) -> dict:
    """One JSON object of a run's files, refusing a malformed, non-UTF-8 or non-object file in one sentence."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}, line {err.lineno}: the JSON is malformed ({err.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: it is not a run's {path.name}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, not the object a run's {path.name} is")
    return value


def read_run(folder: str | Path) -> SavedRun:
    """The run in `folder` (or the adapter `export` wrote from one), refusing anything that is not a finished run."""
    folder = Path(folder)
    require_folder(folder, "the run folder")
    if folder_kind(folder) == "export":
        return read_export(folder)
    files = {}
    for name in ("config.json", "results.json"):
        path = folder / name
        if not path.is_file():
            raise UserError(f"{folder} is not a finished run: it has no {name}")
        files[name] = read_run_json(path)
    run = SavedRun(folder, current_names(files["config.json"]), files["results.json"])
    run.require("task", "method")
    run.config  # noqa: B018 - refused here, in one sentence, if config.json does not hold a valid configuration
    return run


def read_export(folder: Path) -> SavedRun:
    """An exported adapter read as its run: the run's settings and results from `EXPORT_RUN_FILE`."""
    if not (folder / EXPORT_RUN_FILE).is_file():
        raise UserError(f"{folder} is an export without {EXPORT_RUN_FILE} (a merged model, or an export by an older "
                        f"version): export the run again without --merge to evaluate it")
    saved = read_run_json(folder / EXPORT_RUN_FILE)
    if not all(isinstance(saved.get(k), dict) for k in ("config", "results")):
        raise UserError(f"{folder / EXPORT_RUN_FILE} is not an export's: it has no 'config' and 'results' objects")
    run = SavedRun(folder, current_names(saved["config"]), saved["results"], exported=True)
    run.require("task", "method")
    run.config  # noqa: B018 - refused here, in one sentence, if the settings are not a valid configuration
    return run
