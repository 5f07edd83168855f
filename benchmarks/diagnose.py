"""Why are MRPC, RTE and CoLA not learned? Cheap single-seed runs, one knob at a time.

Each run is `bayes-adalora train` on the packaged MiniLM with the real GLUE files, seed 0, batch 32,
fp32, four evaluations; it lands in `<work>/<name>/` and is skipped when its results.json exists,
so the script resumes. The table (`benchmarks/results/diagnose.md`) gives per run the best and the
final dev score of the task's main metric, the trivial baseline of the dev labels (the majority
class, or a constant for STS-B), and the training loss at a quarter, half and the end of the run
(means over 10% windows), so a run that stays at the prior's loss is visible.

    python benchmarks/diagnose.py --glue-dir ../shared/data/glue [--only NAME ...] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from baselines import trivial_baseline  # noqa: E402

# fp32: without AVX512-BF16 (this AMD EPYC) bf16 autocast is emulated: MRPC took 13 CPU-s a step against 2.8
BASE = {"batch_size": 32, "per_device_eval_batch_size": 64, "plots": False, "progress": False,
        "log_correlations": False, "seed": 0, "max_length": 128}

# name: the settings that differ from BASE. MRPC, 150 steps (1.3 epochs: the first grid saw AdamW's loss
# down to 0.47 by step 110 while IVON's stayed at 0.75-0.85), one knob at a time against the defaults.
MRPC_150 = {"task": "mrpc", "max_steps": 150}
PAPER_PHASES_150 = {"tinit": 22, "tfinal": 67, "delta_t": 1}  # 15% / 45% / ~200 maskings, as paper-glue.md
RUNS = {
    "mrpc150-adalora": {**MRPC_150, "method": "adalora"},
    "mrpc150-adalora-lambda-paper": {**MRPC_150, "method": "adalora", "lambda_init": "paper"},
    "mrpc150-adalora-paper-phases": {**MRPC_150, "method": "adalora", **PAPER_PHASES_150},
    "mrpc150-bayes": {**MRPC_150, "method": "bayes-adalora"},
    "mrpc150-bayes-lambda-paper": {**MRPC_150, "method": "bayes-adalora", "lambda_init": "paper"},
    "mrpc150-bayes-paper-phases": {**MRPC_150, "method": "bayes-adalora", **PAPER_PHASES_150},
    "mrpc150-bayes-lr6": {**MRPC_150, "method": "bayes-adalora", "learning_rate": 6.0},
    "mrpc150-bayes-lr12": {**MRPC_150, "method": "bayes-adalora", "learning_rate": 12.0},
    "mrpc150-bayes-ess10x": {**MRPC_150, "method": "bayes-adalora", "ivon_ess": 36680.0},
    "mrpc150-bayes-beta2-0.999": {**MRPC_150, "method": "bayes-adalora", "ivon_beta2": 0.999},
}




def run_one(name: str, settings: dict, glue_dir: str, work: Path) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("DIAGNOSE_THREADS", "1")))
    from bayes_adalora.cli import quiet_libraries
    from bayes_adalora.config import make_config
    from bayes_adalora.errors import TrainingDiverged
    from bayes_adalora.train import train

    quiet_libraries()
    given = {**BASE, **settings, "data_dir": glue_dir, "output_dir": str(work / name)}
    steps = settings.get("max_steps")
    if "eval_steps" not in settings and steps:
        given["eval_steps"] = max(1, steps // 4)
    config, _ = make_config(given)
    try:
        return train(config)
    except TrainingDiverged as error:
        return {"diverged": str(error)}


def window_mean(values: list[float], at: float, width: float = 0.1) -> float:
    """Mean of `values` over the window of `width` (a fraction of the run) ending at fraction `at`."""
    n = len(values)
    end = max(1, round(at * n))
    start = max(0, end - max(1, round(width * n)))
    return statistics.fmean(values[start:end])


def row(name: str, work: Path, glue_dir: str) -> dict | None:
    out = work / name
    if not (out / "results.json").exists():
        return None
    results = json.loads((out / "results.json").read_text())
    config = json.loads((out / "config.json").read_text())
    loss = json.loads((out / "history.json").read_text())["loss"]
    metric = results["main_metric"]
    settings = {k: v for k, v in RUNS.get(name, {}).items() if k not in ("task", "method")}
    return {
        "name": name, "task": results["task"], "method": results["method"], "settings": settings,
        "steps": results["steps"], "lr": config.get("learning_rate", config.get("lr")), "metric": metric,
        "phases": [config.get("tinit"), config.get("tfinal"), config.get("delta_t")],
        "baseline": trivial_baseline(results["task"], glue_dir, metric),
        "best": results["metrics"]["best"][metric], "best_step": results["metrics"]["best"]["step"],
        "final": results["metrics"]["final"][metric],
        "loss": [window_mean(loss, f) for f in (0.1, 0.25, 0.5, 1.0)],
        "seconds": results["train_seconds"],
    }


def report(work: Path, glue_dir: str, out: Path) -> None:
    rows = [r for name in RUNS if (r := row(name, work, glue_dir))]
    lines = ["| run | task | method | settings | steps | tinit/tfinal/delta_t | lr | metric | baseline | best (step) | "
             "final | train loss at 10/25/50/100% | s |", "|---" * 13 + "|"]
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        loss = " / ".join(f"{v:.3f}" for v in r["loss"])
        lines.append(f"| {r['name']} | {r['task']} | {r['method']} | {settings} | {r['steps']} | "
                     f"{'/'.join(str(v) for v in r['phases']) if r['phases'][0] is not None else '-'} | {r['lr']:g} | "
                     f"{r['metric']} | {r['baseline']:.4f} | {r['best']:.4f} ({r['best_step']}) | {r['final']:.4f} | "
                     f"{loss} | {r['seconds']:.0f} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnose.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "diagnose.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR"), required=not os.environ.get("GLUE_DIR"))
    parser.add_argument("--work", type=Path, default=Path("runs/diag"))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=list(RUNS))
    parser.add_argument("--report", action="store_true", help="only write the table from finished runs")
    args = parser.parse_args(argv)
    names = [n for n in (args.only or RUNS) if not (args.work / n / "results.json").exists()]
    if not args.report and names:
        with ProcessPoolExecutor(args.workers) as pool:
            for name, result in zip(names, pool.map(run_one, names, [RUNS[n] for n in names],
                                                    [args.glue_dir] * len(names), [args.work] * len(names))):
                print(name, "diverged" if "diverged" in result else result["metrics"]["best"], flush=True)
    report(args.work, args.glue_dir, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
