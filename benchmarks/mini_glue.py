"""The paper's table in miniature: packaged MiniLM on five GLUE tasks, every method, three seeds.

Resumable: each cell is one `bayes_adalora.train` run in `<work>/<task>/<cell>-seed<k>/`; a cell
whose results.json (or diverged.json) exists is skipped. One command runs the learning-rate sweep (if not done), then
the grid, then writes `benchmarks/results/mini-glue.md` (mean and std per cell, the official metric
per task, the machine, the date and the wall time spent) and `mini-glue.json` beside it.

    python benchmarks/mini_glue.py --glue-dir ../shared/data/glue            # sweep, grid, table
    python benchmarks/mini_glue.py --tune --glue-dir ../shared/data/glue     # the sweep only
    python benchmarks/mini_glue.py --report                                  # table from finished cells
    python benchmarks/mini_glue.py --plan paper                              # DeBERTaV3-base, hub, GPU

Sized for 2 CPU cores in under 3 hours: two cells at a time on one thread each (faster than one
cell on two), batch 16, bf16 autocast (1.5x on this CPU), two evaluations per run (half-way and
at the end; the best is reported), no plots, and the step budgets of TASKS, the same for every
method.

Tuning, equal for every optimizer family: three learning rates per family, a doubling ladder
(IVON: adalora-ivon and every bayes-adalora criterion share one lr, chosen with snr_abs; AdaLoRA
with AdamW; LoRA), seed 0, on SST-2 and MRPC; the lr with the best mean main metric is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import date
from pathlib import Path

from bayes_adalora.methods import METHODS

HERE = Path(__file__).resolve().parent

# (cell name, method, criterion)
CELLS = (
    ("lora", "lora", None),
    ("adalora", "adalora", None),
    ("adalora-ivon", "adalora-ivon", None),
    ("bayes-adalora", "bayes-adalora", "snr_abs"),
    ("bayes-snr", "bayes-adalora", "snr"),
    ("bayes-mean_abs", "bayes-adalora", "mean_abs"),
    ("bayes-inv_sigma", "bayes-adalora", "inv_sigma"),
)
FAMILY = {method: METHODS[method].family for _, method, _ in CELLS}  # the lr ladder each method climbs
TASKS = {  # task: (steps, max_length); same for every method. Pair tasks cost 2-4x a step.
    "sst2": (160, 64),
    "cola": (120, 64),
    "mrpc": (120, 128),
    "stsb": (120, 128),
    "rte": (80, 128),
}
MINI = {
    "batch_size": 16,
    "eval_batch_size": 16,
    "bf16": True,
    "plots": False,
}  # every mini cell; evaluations: half-way and at the end
SEEDS = (0, 1, 2)
# Each ladder holds the lr a 240-step, batch-32 sweep chose (IVON 6, AdaLoRA 4e-3, LoRA 1e-3;
# the first two at the top of their ladders then) and one doubling above it.
LR_GRID = {"ivon": (3.0, 6.0, 12.0), "adalora": (2e-3, 4e-3, 8e-3), "lora": (1e-3, 2e-3, 4e-3)}
# The grid's lr where no tuning sweep has finished: each ladder's middle rung, chosen for these short
# batch-16 runs; on purpose not the package's defaults (`methods.METHODS[...].default_lr`, for 3-epoch runs).
FALLBACK_LR = {"ivon": 6.0, "adalora": 4e-3, "lora": 2e-3}
DIVERGED = "diverged.json"
TUNE_TASKS = ("sst2", "mrpc")  # CoLA gave every method an MCC near 0 in short runs: no signal

# The paper's own scale: every GLUE task, 5 seeds, --recipe paper, DeBERTaV3-base (needs hub + GPU).
PAPER_TASKS = ("mnli", "sst2", "cola", "qqp", "qnli", "rte", "mrpc", "stsb")
PAPER_SEEDS = (2021, 2022, 2023, 2024, 2025)


def cell_given(task: str, cell: str, seed: int, lr: float | None, glue_dir: str | None, out: Path,
               plan: str, overrides: dict | None = None) -> dict:
    """The explicit TrainConfig values of one grid cell."""
    _, method, criterion = next(c for c in CELLS if c[0] == cell)
    given = {"task": task, "method": method, "seed": seed, "output_dir": str(out), "progress": False}
    if criterion:
        given["criterion"] = criterion
    if glue_dir:
        given["data_dir"] = glue_dir
    if plan == "paper":
        given.update(recipe="paper", model="microsoft/deberta-v3-base")
    else:
        steps, max_length = TASKS[task]
        given.update(MINI, max_steps=steps, max_length=max_length, eval_steps=steps // 2, lr=lr)
    return {**given, **(overrides or {})}


def parse_overrides(pairs: list[str]) -> dict:
    """`KEY=VALUE` pairs (VALUE read as JSON where it parses, else a string) for every cell."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def run_cell(given: dict) -> dict:
    """Train one cell (in a worker process, one thread: two cells share two cores). A run that
    diverges is a result too: it leaves <cell>/diverged.json and the grid goes on."""
    import torch

    torch.set_num_threads(int(os.environ.get("MINI_GLUE_THREADS", "1")))
    from bayes_adalora.cli import quiet_libraries
    from bayes_adalora.config import make_config
    from bayes_adalora.errors import TrainingDiverged
    from bayes_adalora.train import train

    quiet_libraries()
    config, _ = make_config(given)
    try:
        return train(config)
    except TrainingDiverged as error:
        out = Path(given["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        (out / DIVERGED).write_text(json.dumps({"error": str(error)}) + "\n")
        return {"diverged": str(error)}


def cell_score(out: Path) -> tuple[bool, float | None]:
    """(finished, best dev score of the main metric); a cell that diverged finished with None."""
    if (out / "results.json").exists():
        r = json.loads((out / "results.json").read_text())
        return True, r["metrics"]["best"][r["main_metric"]]
    return (out / DIVERGED).exists(), None


def run_cells(jobs: list[dict], workers: int, work: Path, phase: str) -> None:
    """Train the cells not done yet; the wall time spent is added to <work>/wall-seconds.json
    under `phase` as each cell ends, so an interrupted grid still counts what it ran."""
    todo = [g for g in jobs if not cell_score(Path(g["output_dir"]))[0]]
    print(f"{len(jobs) - len(todo)} cells done, {len(todo)} to run", flush=True)
    if not todo:
        return
    start = mark = time.time()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run_cell, g): g for g in todo}
        for future in as_completed(futures):
            try:
                given, result = futures[future], future.result()
            except BaseException:  # a bad cell stops the grid now, not after every queued cell ran
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            mark = _add_wall(work, phase, mark)
            if "diverged" in result:
                outcome = result["diverged"]
            else:
                outcome = f"best {result['main_metric']} {result['metrics']['best'][result['main_metric']]:.4f}"
            print(
                f"[{time.time() - start:7.0f}s] {given['task']} {Path(given['output_dir']).name}: {outcome}", flush=True
            )


def _add_wall(work: Path, phase: str, since: float) -> float:
    path = work / "wall-seconds.json"
    wall = json.loads(path.read_text()) if path.exists() else {}
    now = time.time()
    wall[phase] = round(wall.get(phase, 0.0) + now - since, 1)
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(wall) + "\n")
    return now


def best_lrs(tune_dir: Path) -> dict[str, float]:
    """Per family, the lr of the sweep with the best mean main metric over TUNE_TASKS (an lr that
    diverged on any of them is out)."""
    chosen = {}
    for family, means in tuning_scores(tune_dir).items():
        ok = {lr: v for lr, v in means.items() if v is not None}
        chosen[family] = max(ok, key=ok.get) if ok else FALLBACK_LR[family]
    return chosen


def summary(table: dict) -> list[str]:
    """The issue's two questions, answered from the table's means."""
    out = []
    both = [t for t in table if {"bayes-adalora", "adalora"} <= set(table[t])]
    if both:
        wins = [t for t in both if table[t]["bayes-adalora"]["mean"] is not None
                and table[t]["bayes-adalora"]["mean"] >= _mean(table[t]["adalora"])]
        out.append(f"bayes-adalora (snr_abs) at or above adalora on {len(wins)} of {len(both)} tasks"
                   f"{': ' + ', '.join(wins) if wins else ''}.")
    crits = ("bayes-adalora", "bayes-snr", "bayes-mean_abs", "bayes-inv_sigma")
    full = [t for t in table if set(crits) <= set(table[t])]
    if full:
        names = {
            "bayes-adalora": "snr_abs",
            "bayes-snr": "snr",
            "bayes-mean_abs": "mean_abs",
            "bayes-inv_sigma": "inv_sigma",
        }
        from scipy.stats import rankdata

        per_task = [rankdata([-_mean(table[t][c]) for c in crits], method="average") for t in full]
        ranks = {c: statistics.fmean(r[i] for r in per_task) for i, c in enumerate(crits)}
        out.append("Criterion ablation, mean rank over tasks (1 best, ties share): "
                   + ", ".join(f"{names[c]} {ranks[c]:.1f}" for c in crits) + ".")
        for c in ("bayes-mean_abs", "bayes-inv_sigma"):
            gaps = [f"{t} {_mean(table[t][c]) - _mean(table[t]['bayes-adalora']):+.4f}" for t in full]
            out.append(f"{names[c]} minus snr_abs, per task: {', '.join(gaps)}.")
    return out


def _mean(entry: dict) -> float:
    """A cell's mean for comparisons: a cell whose every seed diverged ranks last."""
    return entry["mean"] if entry["mean"] is not None else float("-inf")


def tuning_scores(tune_dir: Path) -> dict[str, dict[float, float]]:
    """Per family and lr, the mean main metric of the finished sweep cells over TUNE_TASKS."""
    chosen = {}
    for family, grid in LR_GRID.items():
        cell = {"ivon": "bayes-adalora", "adalora": "adalora", "lora": "lora"}[family]
        means = {}
        for lr in grid:
            got = [cell_score(tune_dir / task / f"{cell}-lr{lr:g}") for task in TUNE_TASKS]
            if all(finished for finished, _ in got):
                vals = [score for _, score in got]
                means[lr] = None if None in vals else statistics.fmean(vals)
        chosen[family] = means
    return chosen


def report(work: Path, out: Path, lrs: dict, plan: str, seeds, tasks, overrides: dict, tune_dir: Path) -> None:
    table: dict = {}
    for task in tasks:
        for cell, _, _ in CELLS:
            scores, diverged = [], 0
            for seed in seeds:
                finished, score = cell_score(work / task / f"{cell}-seed{seed}")
                if finished and score is None:
                    diverged += 1
                elif finished:
                    scores.append(score)
            if scores or diverged:
                table.setdefault(task, {})[cell] = {
                    "scores": scores, "diverged": diverged,
                    "mean": statistics.fmean(scores) if scores else None,
                    "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                }
        if task in table:
            from bayes_adalora.tasks import get_task

            for entry in table[task].values():
                entry["metric"] = get_task(task).main_metric_name
    meta = {
        "date": date.today().isoformat(), "machine": _machine(), "plan": plan, "seeds": list(seeds),
        "steps_and_max_length": {t: TASKS[t] for t in tasks if t in TASKS} if plan == "mini" else "paper recipe",
        "learning_rates": lrs, "overrides": overrides,
        "settings": MINI if plan == "mini" else "paper recipe",
        "wall_seconds": json.loads(p.read_text()) if (p := work / "wall-seconds.json").exists() else {},
        "tuning": tuning_scores(tune_dir) if plan == "mini" else {},
    }
    out.mkdir(parents=True, exist_ok=True)
    name = "mini-glue" if plan == "mini" else "paper-glue"
    (out / f"{name}.json").write_text(json.dumps({**meta, "results": table}, indent=2) + "\n")
    lines = [
        f"# {'Mini-GLUE' if plan == 'mini' else 'Paper-scale GLUE'}: "
        f"best dev score, mean ± std over seeds {list(seeds)}",
        "",
        f"Machine: {meta['machine']}. Date: {meta['date']}. Learning rates: {lrs}.",
        f"Steps and max length per task: {meta['steps_and_max_length']}. Overrides: {overrides or 'none'}.",
        "",
        "| method | " + " | ".join(f"{t} ({table[t][next(iter(table[t]))]['metric']})" for t in table) + " |",
        "|---|" + "---|" * len(table),
    ]
    for cell, _, _ in CELLS:
        row = [_cell_text(table[t][cell]) if cell in table[t] else "-" for t in table]
        lines.append(f"| {cell} | " + " | ".join(row) + " |")
    lines += ["", *summary(table)]
    if meta["wall_seconds"]:
        wall = meta["wall_seconds"]
        lines.append(f"Wall time spent training: {sum(wall.values()) / 60:.1f} min "
                     f"({', '.join(f'{k} {v / 60:.1f} min' for k, v in wall.items())}).")
    if meta["tuning"]:
        lines += ["", f"Tuning (seed 0, mean over {', '.join(TUNE_TASKS)} of the main metric; "
                      f"IVON's lr chosen with bayes-adalora):", ""]
        lines += [
            f"- {family}: "
            + ", ".join(f"lr {lr:g} → {'diverged' if v is None else f'{v:.4f}'}" for lr, v in scores.items())
            for family, scores in meta["tuning"].items()
        ]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _cell_text(entry: dict) -> str:
    n = f"n={len(entry['scores'])}" + (f", {entry['diverged']} diverged" if entry["diverged"] else "")
    if entry["mean"] is None:
        return f"diverged ({n})"
    return f"{entry['mean']:.4f} ± {entry['std']:.4f} ({n})"


def _machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--glue-dir", default=os.environ.get("GLUE_DIR"), help="GLUE TSV folder (default $GLUE_DIR; none: the hub)"
    )
    parser.add_argument("--work", type=Path, default=Path("runs/mini-glue"), help="where cells are trained (resumable)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--workers", type=int, default=2, help="cells trained at once")
    parser.add_argument("--tune", action="store_true", help="run the learning-rate sweep only")
    parser.add_argument("--report", action="store_true", help="write the table from finished cells only")
    parser.add_argument("--plan", choices=("mini", "paper"), default="mini")
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument(
        "--cells", nargs="+", choices=[c[0] for c in CELLS], help="train only these cells (default: all)"
    )
    parser.add_argument("--tune-dir", type=Path, help="where the lr sweep's cells live (default: WORK/tune); "
                        "point it at another grid's to reuse its learning rates")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a TrainConfig field in every cell, e.g. model=PATH max_steps=20 (with --plan "
                             "paper also warmup_steps and two_phase_const, which the recipe sets for full runs)")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set)
    tune_dir = args.tune_dir or args.work / "tune"
    cells = args.cells or [c[0] for c in CELLS]
    if args.tune and args.plan == "paper":
        parser.error("--tune sweeps the mini plan's lrs; the paper plan takes its lrs from the recipe")
    tasks = args.tasks or (list(TASKS) if args.plan == "mini" else list(PAPER_TASKS))
    seeds = args.seeds or (SEEDS if args.plan == "mini" else PAPER_SEEDS)

    tune_jobs = [
        cell_given(task, cell, 0, lr, args.glue_dir, tune_dir / task / f"{cell}-lr{lr:g}", "mini", overrides)
        for family, grid in LR_GRID.items() for lr in grid for task in TUNE_TASKS
        for cell in [{"ivon": "bayes-adalora", "adalora": "adalora", "lora": "lora"}[family]]
    ]
    if args.tune:
        run_cells(tune_jobs, args.workers, args.work, "tune")
        print("chosen:", best_lrs(tune_dir))
        return 0
    if args.plan == "mini" and not args.report:
        run_cells(tune_jobs, args.workers, args.work, "tune")
    lrs = best_lrs(tune_dir) if args.plan == "mini" else "paper recipe"
    if not args.report:
        jobs = [
            cell_given(task, cell, seed, None if args.plan == "paper" else lrs[FAMILY[method]], args.glue_dir,
                       args.work / task / f"{cell}-seed{seed}", args.plan, overrides)
            for task in tasks for seed in seeds for cell, method, _ in CELLS if cell in cells
        ]
        run_cells(jobs, args.workers, args.work, "grid")
    report(args.work, args.out, lrs, args.plan, seeds, tasks, overrides, tune_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
