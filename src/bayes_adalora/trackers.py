"""Experiment trackers for the CLI's runs (`--report-to`), through accelerate's tracker classes:
TensorBoard (offline, into OUTPUT_DIR/tensorboard), Weights & Biases, MLflow.

What a run logs: every `--logging-steps` steps `train/loss` (the mean over those steps), `train/lr` and
`train/rank_budget`; at each evaluation the main dev metric `eval/<name>`; at those of the logging steps
where the ranks are allocated, IVON's posterior sigma per AdaLoRA factor,
`sigma/<P|lambda|Q>/{p01,median,p99}` (the 1st percentile, median and 99th percentile over every
entry of that factor in the model).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch

from .adapters import parameter_module
from .errors import UserError
from .run_folder import TRACKER_DIR

FACTOR_TAGS = {"P": "P", "λ": "lambda", "Q": "Q"}  # adapters.parameter_module's roles -> tag names
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
PROJECT = "bayes-adalora"  # the W&B project and MLflow experiment unless the environment names another


def sigma_statistics(sigma: dict[str, torch.Tensor], overall: bool = False) -> dict[str, float]:
    """{"sigma/<factor>/{p01,median,p99}": value} over the posterior sigma of every P, lambda and Q entry;
    with `overall`, also "sigma/all/..." over all of them together."""
    by_factor: dict[str, list[np.ndarray]] = {}
    for name, values in sigma.items():
        role = parameter_module(name)[1]
        if role in FACTOR_TAGS:
            by_factor.setdefault(FACTOR_TAGS[role], []).append(values.detach().float().cpu().reshape(-1).numpy())
    if overall and by_factor:
        by_factor["all"] = [chunk for chunks in list(by_factor.values()) for chunk in chunks]
    out = {}
    for factor, chunks in by_factor.items():
        p01, median, p99 = np.percentile(np.concatenate(chunks), [1, 50, 99])
        out.update({f"sigma/{factor}/p01": float(p01), f"sigma/{factor}/median": float(median),
                    f"sigma/{factor}/p99": float(p99)})
    return out


class Trackers:
    """The trackers of one run together: `log` reaches each."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log(self, values: dict, step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)


def tracker_kinds(report_to: list[str] | str) -> list[str]:
    """The trackers `--report-to` names: none, all (those whose package is installed), or the ones listed."""
    kinds = [report_to] if isinstance(report_to, str) else list(report_to)
    if kinds == ["all"]:
        from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

        available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available,
                     "mlflow": is_mlflow_available}
        return [kind for kind, present in available.items() if present()]
    return [kind for kind in kinds if kind != "none"]


@contextmanager
def tracking(report_to: list[str] | str, output_dir: Path, config: dict) -> Iterator[Trackers | None]:
    """The trackers `report_to` names (`tracker_kinds`), for the block, or None where it names none; each is
    started before training, and ended when the block ends (`tracking_one`)."""
    with ExitStack() as stack:
        started = [stack.enter_context(tracking_one(kind, output_dir, config)) for kind in tracker_kinds(report_to)]
        yield Trackers(started) if started else None


@contextmanager
def tracking_one(kind: str, output_dir: Path, config: dict) -> Iterator:
    """`start_tracker`'s tracker for the block, ended when the block ends: as failed (W&B exit code 1,
    MLflow status FAILED) when it raises, so an interrupted or diverged run is not left "running" with
    its last events unflushed."""
    tracker = start_tracker(kind, output_dir, config)
    try:
        yield tracker
    except BaseException:
        if tracker is not None:
            close_as_failed(tracker, kind)
        raise
    if tracker is not None:
        end_tracker(tracker, failed=False)


def close_as_failed(tracker, kind: str) -> None:
    """End the tracker's run as failed; an error doing so is a warning, so that the error that ended the run
    (e.g. "diverged", exit 1) is the one reported."""
    try:
        end_tracker(tracker, failed=True)
    except Exception as exc:
        warnings.warn(f"--report-to {kind}: the tracker's run was not closed ({type(exc).__name__}: {exc})",
                      stacklevel=2)


def end_tracker(tracker, failed: bool) -> None:
    if failed and tracker.name == "wandb":
        tracker.run.finish(exit_code=1)
    elif failed and tracker.name == "mlflow":
        import mlflow

        mlflow.end_run(status="FAILED")
    else:
        tracker.finish()


def start_tracker(kind: str, output_dir: Path, config: dict):
    """An accelerate tracker for `kind` (None for "none"), its run named after the output folder (in the
    W&B project $WANDB_PROJECT, the MLflow experiment $MLFLOW_EXPERIMENT_NAME, else "bayes-adalora"),
    holding the run's resolved configuration; a missing package is refused in one sentence. A tracker
    that fails to store the configuration is ended as failed before the error goes on."""
    if kind == "none":
        return None
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}
    if not available[kind]():
        raise UserError(f"--report-to {kind} needs the {PACKAGES[kind]} package: pip install {PACKAGES[kind]}")
    run_name = Path(output_dir).name
    if kind == "tensorboard":
        tracker = LOGGER_TYPE_TO_CLASS[kind](run_name, Path(output_dir) / TRACKER_DIR)
    elif kind == "mlflow":  # accelerate reads $MLFLOW_EXPERIMENT_NAME over the experiment given
        tracker = LOGGER_TYPE_TO_CLASS[kind](experiment_name=PROJECT, run_name=run_name)
    else:  # accelerate's WandBTracker takes its first argument as the W&B project
        tracker = LOGGER_TYPE_TO_CLASS[kind](os.environ.get("WANDB_PROJECT") or PROJECT, name=run_name)
    tracker.start()
    try:
        tracker.store_init_configuration({k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                          for k, v in config.items()})
    except BaseException:
        close_as_failed(tracker, kind)  # not left "running" (or TensorBoard's writer open)
        raise
    return tracker
