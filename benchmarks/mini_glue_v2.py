"""Mini-GLUE v2: MiniLM on five GLUE tasks, long enough to be learned, with paired statistics.

Mini-GLUE v2. Every cell is one `bayes-adalora train` run (a subprocess, one thread) whose
result is written as one small JSON file under `benchmarks/results/mini-glue-v2/cells/` with the
commit and the command that produced it; a cell whose JSON exists is skipped, so the grid resumes
from committed cells in a later session. Run it from a `git worktree` pinned at one commit and
point `--results` at the main checkout's folder, so later edits do not mix code versions:

    git worktree add /work/grid <COMMIT>
    cd /work/grid && python benchmarks/mini_glue_v2.py --glue-dir ../shared/data/glue \
        --results /work/main/benchmarks/results/mini-glue-v2 --work /work/grid-runs
    python benchmarks/mini_glue_v2.py --report --glue-dir ../shared/data/glue   # table + figure only

Order of work (so an interrupted grid has the most useful cells first): the learning-rate sweep,
then lora / adalora / bayes-adalora on every task with seeds 0-2, then the ablation cells on
ABLATION_TASKS, then seeds 3-4 of adalora and bayes-adalora on tasks whose paired difference is
within 1.5 standard errors of zero.

Tuning, equal effort and not on what is reported: each optimizer family (IVON, AdaLoRA+AdamW,
LoRA+AdamW) gets the same number of learning rates, on a doubling ladder, trained with seed 100
on a held-out 10% of the *training* file of SST-2 (written under --work); the rung with the best
held-out score is kept for every task. While some family's best sits at its ladder's edge, every
family gets one more rung, by one rule (`next_rung`: past the edge by a doubling, else halfway, in
log scale, towards the better neighbour of the best), up to EXTRA_ROUNDS rounds; a choice still at
an edge after them is flagged in the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from baselines import trivial_baseline  # noqa: E402


@dataclass(frozen=True)
class Cell:
    name: str
    method: str
    criterion: str | None = None
    lambda_init: str | None = None  # None: the default of the pinned commit

    @property
    def family(self) -> str:
        return {"lora": "lora", "adalora": "adalora"}.get(self.method, "ivon")


CORE = (Cell("lora", "lora"), Cell("adalora", "adalora"), Cell("bayes-adalora", "bayes-adalora", "snr_abs"))
ABLATION = (
    Cell("adalora-ivon", "adalora-ivon"),
    Cell("bayes-snr", "bayes-adalora", "snr"),
    Cell("bayes-mean_abs", "bayes-adalora", "mean_abs"),
    Cell("bayes-inv_sigma", "bayes-adalora", "inv_sigma"),
    Cell("adalora-lambda-paper", "adalora", lambda_init="paper"),
    Cell("bayes-adalora-lambda-paper", "bayes-adalora", "snr_abs", lambda_init="paper"),
)
CELLS = {c.name: c for c in (*CORE, *ABLATION)}
# each ablation cell against the core cell it differs from in one thing: the criterion with the optimizer
# held (IVON), or lambda's start with the method held
REFERENCE = {"adalora-ivon": "bayes-adalora", "bayes-snr": "bayes-adalora", "bayes-mean_abs": "bayes-adalora",
             "bayes-inv_sigma": "bayes-adalora", "adalora-lambda-paper": "adalora",
             "bayes-adalora-lambda-paper": "bayes-adalora"}


@dataclass(frozen=True)
class TaskPlan:
    steps: int  # optimizer steps at batch BATCH, the same for every method
    max_length: int
    eval_times: int = 4  # evaluations per run (the best is reported)


# Run lengths (batch 32): MRPC 3 epochs, CoLA 2, STS-B 1.5, RTE 2, SST-2 0.14 (it learns fast). On
# one quiet core a step costs about 0.5 s (CoLA) to 3.5 s (RTE), so the grid below is about 10 CPU-hours;
# the budget is about 8, so RTE and STS-B are shorter than their tasks would like.
TASKS = {
    "sst2": TaskPlan(steps=300, max_length=64),
    "cola": TaskPlan(steps=540, max_length=64),
    "mrpc": TaskPlan(steps=345, max_length=128),
    "stsb": TaskPlan(steps=270, max_length=128),
    "rte": TaskPlan(steps=156, max_length=128),
}
BATCH = 32


def common_flags(eval_batch: int) -> list[str]:
    # fp32: without AVX512-BF16 (this AMD EPYC) bf16 autocast is emulated: MRPC took 13 CPU-s a step against 2.8
    return ["--batch-size", str(BATCH), "--per-device-eval-batch-size", str(eval_batch), "--no-plots", "--no-progress",
            "--no-log-correlations"]


SEEDS = (0, 1, 2)
EXTRA_SEEDS = (3, 4)
NAME = "mini-glue-v2"  # the results folder under benchmarks/results, and the stem of the table, figure and JSON
ABLATION_TASKS = ("sst2", "stsb")
TUNE_TASKS = ("sst2",)  # one task keeps the sweep at about 12 x 4 CPU-minutes
TUNE_SEED = 100
LADDERS = {"ivon": (1.5, 3.0, 6.0, 12.0), "adalora": (1e-3, 2e-3, 4e-3, 8e-3), "lora": (5e-4, 1e-3, 2e-3, 4e-3)}
EXTRA_ROUNDS = 2  # rounds of one more rung per family while some family's best is at its ladder's edge
TUNE_CELL = {"ivon": CELLS["bayes-adalora"], "adalora": CELLS["adalora"], "lora": CELLS["lora"]}
# what "learned" means: AdaLoRA+AdamW's mean clears the trivial baseline by this margin and,
# for CoLA and STS-B (whose baselines are 0), reaches an absolute floor too
LEARNED_MARGIN = 0.05
LEARNED_FLOOR = {"cola": 0.15, "stsb": 0.70}

# The same grid on a GPU (`--plan gpu`; benchmarks/gpu_grid_v2.sh runs it on a lent device):
# five seeds on every task, the ablation's too, and runs of several epochs, towards the paper's 5-50 (batch
# 32): SST-2 1 epoch, CoLA 5, MRPC 10, STS-B 6, RTE 15. The core cells are 6,845 steps a seed, the ablation's
# 3,185, so 198,000 steps in all, and its own learning-rate sweep (12 to 18 SST-2 cells of 2,105 steps) comes
# first: about 230,000 steps, several leases; it resumes from the committed cells like the CPU's.
GPU_TASKS = {
    "sst2": TaskPlan(steps=2105, max_length=64, eval_times=6),
    "cola": TaskPlan(steps=1340, max_length=64, eval_times=6),
    "mrpc": TaskPlan(steps=1150, max_length=128, eval_times=6),
    "stsb": TaskPlan(steps=1080, max_length=128, eval_times=6),
    "rte": TaskPlan(steps=1170, max_length=128, eval_times=6),
}


@dataclass(frozen=True)
class Plan:
    tasks: dict
    seeds: tuple
    extra_seeds: tuple
    eval_batch: int
    name: str
    note: str = ""  # a line under the table's header


CPU_CUT = ("The issue's budget was about 8 CPU-hours. Cut towards it: short runs (MRPC 3 epochs, CoLA 2, STS-B 1.5, "
           "RTE 2, SST-2 0.14; CoLA, MRPC and RTE were not learned in them), seeds 3-4 only where the paired "
           "difference was undecided after 3, and the ablation on the two learned tasks with 3 seeds. Nothing else.")
PLANS = {"cpu": Plan(TASKS, SEEDS, EXTRA_SEEDS, 64, NAME, CPU_CUT),
         "gpu": Plan(GPU_TASKS, (0, 1, 2, 3, 4), (), 256, "mini-glue-v2-gpu",
                     "The MiniLM weights travelled to the GPU as fp16 (the 64 MiB transfer limit) and were loaded "
                     "as fp32: each base weight is the packaged one rounded to fp16, unlike the CPU table's.")}


def use_plan(name: str) -> None:
    """Make plan `name` the one this module runs and reports. It sets the module's globals, which every
    function reads: grid_workers.py calls a pinned checkout's functions with their signatures of then, so
    a plan cannot be a new argument of theirs."""
    global TASKS, SEEDS, EXTRA_SEEDS, COMMON, NAME, NOTE
    plan = PLANS[name]
    TASKS, SEEDS, EXTRA_SEEDS, NAME, NOTE = plan.tasks, plan.seeds, plan.extra_seeds, plan.name, plan.note
    COMMON = common_flags(plan.eval_batch)


use_plan("cpu")  # the default; `--plan gpu` switches


# ---------------------------------------------------------------- cells on disk


def cell_path(results: Path, task: str, cell: str, seed: int) -> Path:
    return results / "cells" / task / f"{cell}-seed{seed}.json"


def tune_path(results: Path, task: str, family: str, lr: float) -> Path:
    return results / "tune" / task / f"{family}-lr{lr:g}.json"


def git_commit() -> str:
    """The commit of this checkout, suffixed -dirty when its code differs from it. A copy without git (a
    device's) names it in $MINI_GLUE_COMMIT, as benchmarks/gpu_prepare.sh records it."""
    root = HERE.parent
    if not (root / ".git").exists() and os.environ.get("MINI_GLUE_COMMIT"):
        return os.environ["MINI_GLUE_COMMIT"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "benchmarks/*.py"], cwd=root,
                           capture_output=True, text=True).stdout.strip()
    return commit + ("-dirty" if dirty else "")


def heldout_dir(work: Path, glue_dir: Path, task: str) -> Path:
    """A GLUE-layout folder whose train.tsv is 90% of the task's training file and dev.tsv the
    other 10% (a fixed shuffle), for tuning without looking at the reported dev set."""
    from bayes_adalora.tasks import get_task

    spec = get_task(task)
    out = work / "heldout" / spec.glue_dir
    if (out / "dev.tsv").exists():
        return out.parent
    lines = (glue_dir / spec.glue_dir / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    header, rows = (lines[:1], lines[1:]) if spec.tsv_has_header else ([], lines)
    rows = [r for r in rows if r.strip()]
    random.Random(1234).shuffle(rows)
    n_dev = max(1, len(rows) // 10)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.tsv").write_text("".join(header + rows[n_dev:]), encoding="utf-8")
    (out / "dev.tsv").write_text("".join(header + rows[:n_dev]), encoding="utf-8")
    return out.parent


def train_args(task: str, cell: Cell, seed: int, lr: float, data_dir: Path, out: Path, extra: list[str]) -> list[str]:
    plan = TASKS[task]
    args = ["train", "--task", task, "--method", cell.method, "--seed", str(seed), "--learning-rate", f"{lr:g}",
            "--max-steps", str(plan.steps), "--max-length", str(plan.max_length),
            "--eval-steps", str(max(1, plan.steps // plan.eval_times)), "--data-dir", str(data_dir),
            "--output-dir", str(out), "--overwrite", *COMMON]
    if cell.criterion:
        args += ["--criterion", cell.criterion]
    if cell.lambda_init:
        args += ["--lambda-init", cell.lambda_init]
    return args + extra


def run_train(args: list[str], threads: int) -> tuple[int, str]:
    """`bayes-adalora <args>` in a subprocess on `threads` threads, with this checkout's package
    (the pinned worktree's, whatever an editable install points at); (exit code, stderr)."""
    pythonpath = os.pathsep.join(p for p in (str(HERE.parent / "src"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath}
    proc = subprocess.run([sys.executable, "-m", "bayes_adalora.cli", *args], env=env, capture_output=True,
                          text=True, check=False)
    return proc.returncode, proc.stderr


def read_main_metric(out: Path) -> dict:
    """What a v2 cell keeps of a finished run folder: its main metric's best and final dev score."""
    results = json.loads((out / "results.json").read_text())
    metric = results["main_metric"]
    return dict(metric=metric, best=results["metrics"]["best"][metric], best_step=results["metrics"]["best"]["step"],
                final=results["metrics"]["final"][metric], steps=results["steps"],
                train_seconds=round(results["train_seconds"], 1), total_rank=results["total_rank"])


def run_cell(args: list[str], record: dict, path: Path, threads: int, read=read_main_metric) -> dict:
    """Train one cell and write its JSON (a diverged run is a result too); `read(run_folder)` gives what
    the JSON keeps of a finished run (Mini-GLUE v3 keeps every metric, the loss curve and sigma)."""
    start = time.time()
    code, stderr = run_train(args, threads)
    out = Path(args[args.index("--output-dir") + 1])
    record = {**record, "command": shlex.join(["bayes-adalora", *args]), "commit": git_commit(),
              "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "wall_seconds": round(time.time() - start, 1), "machine": machine()}
    if code == 0:
        record.update(read(out))
    elif code == 1 and "diverged" in stderr:
        record.update(diverged=stderr.strip().splitlines()[-1])
    else:
        raise RuntimeError(f"cell {path.name} failed (exit {code}): {stderr.strip()[-2000:]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)
    return record


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def score(record: dict | None) -> float | None:
    """The best dev score of the main metric; NaN (an undefined correlation) and divergence give None."""
    if record is None or "best" not in record or record["best"] is None or math.isnan(record["best"]):
        return None
    return record["best"]


# ---------------------------------------------------------------- tuning


def family_scores(results: Path, family: str, rungs) -> dict[float, float | None]:
    """lr -> the mean over TUNE_TASKS of the held-out score (None: diverged), for the rungs that have run."""
    table = {}
    for lr in rungs:
        records = [load(tune_path(results, t, family, lr)) for t in TUNE_TASKS]
        if all(r is not None for r in records):
            scores = [score(r) for r in records]
            table[lr] = None if None in scores else statistics.fmean(scores)
    return table


def best_rung(scores: dict[float, float | None]) -> float | None:
    ok = {lr: v for lr, v in scores.items() if v is not None}
    return max(ok, key=ok.get) if ok else None


def at_edge(rungs, best: float | None) -> bool:
    return best is not None and len(rungs) > 1 and best in (min(rungs), max(rungs))


def next_rung(scores: dict[float, float]) -> float:
    """One more rung for a family whose rungs have all run: a doubling past the best if it is the
    ladder's top (a halving if its bottom), else the log-scale midpoint between the best and its
    better-scoring neighbour (3 significant digits). A family whose every rung diverged goes lower."""
    rungs = sorted(scores)
    best = best_rung(scores)
    if best is None:
        return float(f"{rungs[0] / 2:.3g}")
    if best == rungs[-1]:
        return float(f"{best * 2:.3g}")
    if best == rungs[0]:
        return float(f"{best / 2:.3g}")
    i = rungs.index(best)
    below, above = scores[rungs[i - 1]], scores[rungs[i + 1]]
    neighbour = rungs[i + 1] if (above if above is not None else -math.inf) > (below if below is not None else
                                                                              -math.inf) else rungs[i - 1]
    return float(f"{math.sqrt(best * neighbour):.3g}")


def ladders(results: Path) -> tuple[dict[str, tuple[float, ...]], bool]:
    """Every family's rungs so far (LADDERS plus the extra rounds that the finished rungs call for), and
    whether the sweep is complete: every rung has run and no further round is due."""
    rungs = {f: tuple(ladder) for f, ladder in LADDERS.items()}
    for round_ in range(EXTRA_ROUNDS + 1):
        scores = {f: family_scores(results, f, r) for f, r in rungs.items()}
        if any(len(scores[f]) < len(rungs[f]) for f in rungs):
            return rungs, False
        if round_ == EXTRA_ROUNDS or not any(at_edge(r, best_rung(scores[f])) for f, r in rungs.items()):
            return rungs, True
        rungs = {f: (*r, next_rung(scores[f])) for f, r in rungs.items()}
    raise AssertionError("unreachable")


def tuning_table(results: Path) -> dict[str, dict[float, float | None]]:
    """Per family and lr (in the order the rungs were added), the mean over TUNE_TASKS of the held-out score
    (None: diverged; rungs that have not run are left out)."""
    rungs, _ = ladders(results)
    return {f: family_scores(results, f, r) for f, r in rungs.items()}


def chosen_lrs(results: Path) -> dict[str, float] | None:
    """The best rung per family, or None while the sweep is unfinished."""
    rungs, complete = ladders(results)
    if not complete:
        return None
    chosen = {}
    for family, r in rungs.items():
        best = best_rung(family_scores(results, family, r))
        chosen[family] = best if best is not None else r[0]
    return chosen


# ---------------------------------------------------------------- statistics


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, half-width of the t interval, standard error) over seeds."""
    from scipy.stats import t

    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, math.nan, math.nan
    se = statistics.stdev(values) / math.sqrt(n)
    return mean, t.ppf(0.5 + level / 2, n - 1) * se, se


def paired(results: Path, task: str, a: str, b: str, seeds) -> dict | None:
    """The paired difference a - b over the seeds where both finished with a score."""
    pairs = [(score(load(cell_path(results, task, a, s))), score(load(cell_path(results, task, b, s)))) for s in seeds]
    diffs = [x - y for x, y in pairs if x is not None and y is not None]
    if len(diffs) < 2:
        return None
    mean, half, se = t_interval(diffs)
    return {"n": len(diffs), "mean": mean, "low": mean - half, "high": mean + half, "se": se,
            "significant": not (mean - half <= 0 <= mean + half)}


def needs_more_seeds(results: Path, task: str) -> bool:
    """5 seeds where bayes-adalora - adalora is within 1.5 standard errors of zero after 3."""
    diff = paired(results, task, "bayes-adalora", "adalora", SEEDS)
    return diff is not None and abs(diff["mean"]) < 1.5 * diff["se"]


# ---------------------------------------------------------------- the plan


def jobs(results: Path, work: Path, glue_dir: Path, lrs: dict | None, extra: list[str]):
    """(path, args, record) of every cell in priority order; cells already on disk are skipped by the caller."""
    for family, ladder in ladders(results)[0].items():
        for lr in ladder:
            for task in TUNE_TASKS:
                cell = TUNE_CELL[family]
                out = work / "tune" / task / f"{family}-lr{lr:g}"
                args = train_args(task, cell, TUNE_SEED, lr, heldout_dir(work, glue_dir, task), out, extra)
                yield tune_path(results, task, family, lr), args, {
                    "task": task, "family": family, "cell": cell.name, "seed": TUNE_SEED, "lr": lr, "heldout": True}
    if lrs is None:
        return
    stages = [(CORE, tuple(TASKS), SEEDS), (ABLATION, ABLATION_TASKS, SEEDS)]
    for cells, tasks, seeds in stages:
        for task in tasks:
            for seed in seeds:
                for cell in cells:
                    yield cell_job(results, work, glue_dir, lrs, task, cell, seed, extra)
    for task in TASKS:  # decided only once the three seeds are in
        if needs_more_seeds(results, task):
            for seed in EXTRA_SEEDS:
                for cell in (CELLS["adalora"], CELLS["bayes-adalora"]):
                    yield cell_job(results, work, glue_dir, lrs, task, cell, seed, extra)


def cell_job(results: Path, work: Path, glue_dir: Path, lrs: dict, task: str, cell: Cell, seed: int,
             extra: list[str]):
    lr = lrs[cell.family]
    out = work / "grid" / task / f"{cell.name}-seed{seed}"
    args = train_args(task, cell, seed, lr, glue_dir, out, extra)
    return cell_path(results, task, cell.name, seed), args, {
        "task": task, "cell": cell.name, "method": cell.method, "criterion": cell.criterion,
        "lambda_init": cell.lambda_init, "seed": seed, "lr": lr}


def run_grid(results: Path, work: Path, glue_dir: Path, threads: int, limit_minutes: float | None,
             extra: list[str]) -> None:
    deadline = time.time() + 60 * limit_minutes if limit_minutes else math.inf
    while True:
        lrs = chosen_lrs(results)
        todo = [(p, a, r) for p, a, r in jobs(results, work, glue_dir, lrs, extra) if not p.exists()]
        if not todo:
            if lrs is not None:
                return
            raise RuntimeError("the sweep has nothing left to run but chose no learning rates")
        if time.time() > deadline:
            print(f"time limit reached; {len(todo)} cells left", flush=True)
            return
        path, args, record = todo[0]
        done = run_cell(args, record, path, threads)
        outcome = done.get("diverged") or f"best {done['metric']} {done['best']:.4f} ({done['train_seconds']:.0f} s)"
        print(f"{datetime.now():%H:%M} {path.relative_to(results)}: {outcome}", flush=True)


# ---------------------------------------------------------------- the table and figure


def learned(task: str, adalora_mean: float | None, baseline: float) -> bool:
    if adalora_mean is None:
        return False
    return adalora_mean >= max(baseline + LEARNED_MARGIN, LEARNED_FLOOR.get(task, -math.inf))


def summarize(results: Path, glue_dir: str) -> dict:
    from bayes_adalora.tasks import get_task

    lrs = chosen_lrs(results)
    tasks = {}
    for task in TASKS:
        metric = get_task(task).main_metric_name
        baseline = trivial_baseline(task, glue_dir, metric)
        methods = {}
        for name in CELLS:
            records = [r for s in (*SEEDS, *EXTRA_SEEDS) if (r := load(cell_path(results, task, name, s)))]
            if not records:
                continue
            scores = [v for r in records if (v := score(r)) is not None]
            entry = {"n": len(records), "scores": scores, "diverged": sum("diverged" in r for r in records),
                     "undefined": sum("best" in r and score(r) is None for r in records)}
            if scores:
                mean, half, _ = t_interval(scores)
                entry.update(mean=mean, std=statistics.stdev(scores) if len(scores) > 1 else math.nan,
                             low=mean - half, high=mean + half)
            methods[name] = entry
        seeds_done = sorted({r["seed"] for s in (*SEEDS, *EXTRA_SEEDS)
                             if (r := load(cell_path(results, task, "bayes-adalora", s)))})
        tasks[task] = {
            "metric": metric, "baseline": baseline, "methods": methods,
            "learned": learned(task, methods.get("adalora", {}).get("mean"), baseline),
            "paired": {name: paired(results, task, name, "adalora", (*SEEDS, *EXTRA_SEEDS))
                       for name in CELLS if name not in ("adalora",) and name in methods},
            "paired_reference": {name: paired(results, task, name, ref, (*SEEDS, *EXTRA_SEEDS))
                                 for name, ref in REFERENCE.items() if name in CELLS and name in methods},
            "seeds": seeds_done,
        }
    rungs, _ = ladders(results)
    edges = {f: at_edge(rungs[f], lr) for f, lr in (lrs or {}).items()}
    commits = cell_commits(results / "cells")
    planned = [cell_path(results, task, c.name, seed)
               for cells, task_list in ((CORE, TASKS), (ABLATION, ABLATION_TASKS))
               for task in task_list for c in cells for seed in SEEDS]
    machines = sorted({r["machine"] for folder in ("cells", "tune") for r in cell_records(results / folder)
                       if "machine" in r})
    # where the cells ran, as they say; the CPU grid's first cells did not record it and ran here
    here = machine() if PLANS["cpu"].name == NAME else "machine not recorded"
    return {"machine": "; ".join(machines) or here,
            "learning_rates": lrs, "at_ladder_edge": edges, "tuning": tuning_table(results),
            "tasks": tasks,
            "commits": commits, "tuning_commits": cell_commits(results / "tune"),
            "cells_done": sum(p.exists() for p in planned), "cells_planned": len(planned),
            "cost_hours": cost_hours(results),
            "plans": {t: vars(p) for t, p in TASKS.items()}, "batch": BATCH}


def cost_hours(results: Path) -> dict:
    """Hours of one thread (each cell's wall time; every cell ran on one thread) spent on the cells and the
    tuning runs, and how many of each."""
    records = {folder: cell_records(results / folder) for folder in ("cells", "tune")}
    return {folder: {"n": len(rs), "hours": sum(r.get("wall_seconds", 0) for r in rs) / 3600}
            for folder, rs in records.items()}


def cell_records(folder: Path) -> list[dict]:
    """Every cell JSON under `folder` (none if it does not exist)."""
    return [load(p) for p in folder.rglob("*.json")] if folder.is_dir() else []


def cell_commits(folder: Path) -> list[str]:
    return sorted({r["commit"] for r in cell_records(folder)})


def machine() -> str:
    """The processor and its core count, and the GPUs that nvidia-smi lists, if any."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    gpus = []
    if shutil.which("nvidia-smi"):
        try:
            listed = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                    capture_output=True, text=True, check=False, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            listed = "unknown GPU"
        gpus = [line.strip() for line in listed.splitlines() if line.strip()]
    return f"{names[0] if names else 'CPU'}, {os.cpu_count()} cores" + "".join(f", {g}" for g in gpus)


def fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def learned_status(task: dict) -> str:
    """"yes" / "no" once adalora has its seeds; before that "not run" (no cell of the task yet) or
    "pending (k of 3 adalora seeds)"."""
    n_adalora = task["methods"].get("adalora", {}).get("n", 0)
    if n_adalora < len(SEEDS):
        return f"pending ({n_adalora} of {len(SEEDS)} adalora seeds)" if task["methods"] else "not run"
    return "yes" if task["learned"] else "no"


def signed(x: float) -> str:
    return f"{round(x, 4) + 0.0:+.4f}"  # + 0.0: a difference of -1e-17 (equal scores) prints as +0.0000


def pair_text(d: dict | None) -> str:
    return "-" if d is None else (f"{signed(d['mean'])} [{signed(d['low'])}, {signed(d['high'])}]"
                                  f"{' *' if d['significant'] else ''} (n={d['n']})")


def markdown(summary: dict) -> str:
    title = "Mini-GLUE v2" + (" on a GPU" if PLANS["gpu"].name == NAME else "")
    lines = [f"# {title}: MiniLM, best dev score over a run, paired seeds", "",
             f"Commit(s) the cells ran at: {', '.join(summary['commits']) or 'none yet'}; the tuning cells: "
             f"{', '.join(summary.get('tuning_commits', [])) or 'none yet'}. "
             f"Batch {summary['batch']}, fp32, one thread per cell, {summary['machine']}.", "",
             "Run lengths: " + ", ".join(f"{t} {p['steps']} steps (max length {p['max_length']})"
                                          for t, p in summary["plans"].items()) + ".", ""]
    cost = summary["cost_hours"]
    lines += [f"Cost: {cost['cells']['n']} cells and {cost['tune']['n']} tuning runs took "
              f"{cost['cells']['hours'] + cost['tune']['hours']:.1f} hours of one thread (each run's wall time, "
              f"{cost['tune']['hours']:.1f} of them tuning). " + NOTE, ""]
    if summary["cells_done"] < summary["cells_planned"]:
        later = f"; seeds {EXTRA_SEEDS[0]}-{EXTRA_SEEDS[-1]} come after, where needed" if EXTRA_SEEDS else ""
        lines += [f"**Partial:** {summary['cells_done']} of the {summary['cells_planned']} planned cells (seeds "
                  f"{SEEDS[0]}-{SEEDS[-1]}{later}) have run; the grid goes on from the committed cells.", ""]
    lrs = summary["learning_rates"]
    if lrs:
        edge = [f for f, e in summary["at_ladder_edge"].items() if e]
        lines.append(f"Learning rates (tuned on held-out training data, seed {TUNE_SEED}): "
                     + ", ".join(f"{f} {lr:g}" for f, lr in lrs.items())
                     + (f"; at a ladder's edge: {', '.join(edge)}" if edge else "; none at a ladder's edge") + ".")
    lines += ["", "| task | metric | baseline | learned | seeds | " + " | ".join(CELLS) + " |",
              "|---" * (5 + len(CELLS)) + "|"]
    for task, t in summary["tasks"].items():
        cells = []
        for name in CELLS:
            m = t["methods"].get(name)
            if m is None:
                cells.append("-")
            elif "mean" not in m:
                cells.append(f"no score (n={m['n']})")
            else:
                cells.append(f"{m['mean']:.4f} ± {fmt(m['std'])} (n={len(m['scores'])})")
        status = learned_status(t)
        lines.append(f"| {task} | {t['metric']} | {t['baseline']:.4f} | {status} | {len(t['seeds'])} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Paired differences against adalora (same seeds), mean and 95% t interval over seeds:", "",
              "| task | " + " | ".join(n for n in CELLS if n != "adalora") + " |", "|---" * len(CELLS) + "|"]
    for task, t in summary["tasks"].items():
        row = []
        for name in CELLS:
            if name == "adalora":
                continue
            row.append(pair_text(t["paired"].get(name)))
        lines.append(f"| {task} | " + " | ".join(row) + " |")
    lines += ["", "`*`: the interval excludes 0. A task marked not learned says nothing about allocation.", ""]
    compared = [n for n in REFERENCE if n in CELLS and any(n in t.get("paired_reference", {})
                                                           for t in summary["tasks"].values())]
    if compared:
        lines += ["The ablation against the cell it differs from in one thing (the criterion, IVON held; lambda's "
                  "start, the method held), paired over the seeds both have:", "",
                  "| task | " + " | ".join(f"{n} - {REFERENCE[n]}" for n in compared) + " |",
                  "|---" * (1 + len(compared)) + "|"]
        for task, t in summary["tasks"].items():
            if not t.get("paired_reference"):
                continue
            row = [pair_text(t["paired_reference"].get(n)) for n in compared]
            lines.append(f"| {task} | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["Tuning (mean held-out score over " + ", ".join(TUNE_TASKS) + "):", ""]
    for family, scores in summary["tuning"].items():
        lines.append(f"- {family}: " + ", ".join(f"lr {lr:g} → {fmt(v)}" for lr, v in scores.items()))
    return "\n".join(lines) + "\n"


def figure(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        t = summary["tasks"][task]
        names = [n for n in CELLS if "mean" in t["methods"].get(n, {})]
        means = [t["methods"][n]["mean"] for n in names]
        errs = [0 if math.isnan(t["methods"][n]["high"] - t["methods"][n]["mean"])
                else t["methods"][n]["high"] - t["methods"][n]["mean"] for n in names]
        ax.errorbar(range(len(names)), means, yerr=errs, fmt="o", capsize=3)
        ax.axhline(t["baseline"], color="grey", linestyle="--", linewidth=1, label="trivial baseline")
        ax.set_xticks(range(len(names)), names, rotation=70, fontsize=7)
        status = learned_status(t)
        note = {"yes": "", "no": ", not learned"}.get(status, f", {status}")
        ax.set_title(f"{task} ({t['metric']}){note}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Mini-GLUE v2: mean and 95% t interval over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(summary: dict, out: Path, name: str, to_markdown, draw) -> dict:
    """`name`.json, .md (`to_markdown(summary)`) and .png (`draw(summary, path)`) under `out`; the table printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (out / f"{name}.md").write_text(to_markdown(summary))
    draw(summary, out / f"{name}.png")
    print(to_markdown(summary))
    return summary


def report(results: Path, glue_dir: str, out: Path) -> dict:
    return write_report(summarize(results, glue_dir), out, NAME, markdown, figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue-dir", type=Path, default=os.environ.get("GLUE_DIR"),
                        required=not os.environ.get("GLUE_DIR"))
    parser.add_argument("--plan", choices=tuple(PLANS),
                        help="cpu (the default): the grid of mini-glue-v2.md; gpu: 5 seeds and runs of several "
                        "epochs, for a lent GPU (benchmarks/gpu_grid_v2.sh)")
    parser.add_argument("--results", type=Path,
                        help="where cell JSONs live (commit them: the grid resumes from them); default: "
                        "benchmarks/results/mini-glue-v2, or mini-glue-v2-gpu for --plan gpu")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="where the table and figure go")
    parser.add_argument("--work", type=Path, default=Path("runs/mini-glue-v2"), help="run folders (not kept)")
    parser.add_argument("--threads", type=int, default=1, help="threads per cell")
    parser.add_argument("--minutes", type=float, help="start no new cell after this many minutes")
    parser.add_argument("--report", action="store_true", help="only write the table and figure from the cells")
    parser.add_argument("--extra-args", default="", help="more `train` flags for every cell, e.g. '--model PATH' "
                        "(they are part of each cell's recorded command)")
    args = parser.parse_args(argv)
    if args.plan:
        use_plan(args.plan)
    args.results = args.results or HERE / "results" / NAME
    if not args.report:
        run_grid(args.results, args.work, args.glue_dir.resolve(), args.threads, args.minutes,
                 shlex.split(args.extra_args))
    report(args.results, str(args.glue_dir), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
