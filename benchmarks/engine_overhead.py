"""The command line's cost per training step, this checkout against another (e.g. the commit before the CLI
moved onto transformers.Trainer): the same `bayes-adalora train` run from each, interleaved, with one thread.

Each run trains the packaged MiniLM on SST-2 (batch 32, length 64) for `--steps` steps without evaluations
between, and reports `seconds_per_step` from its results.json (the time inside the optimizer steps, as the
run measures it) and its wall time. The runs alternate between the two checkouts, `--repeats` times, so a
busy machine slows both alike; medians are reported with their ratio.

    git worktree add ../before COMMIT
    python benchmarks/engine_overhead.py --baseline ../before --glue-dir $GLUE_DIR --steps 60 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
RESULTS = HERE / "benchmarks" / "results" / "engine-overhead.json"


def run(checkout: Path, glue: Path, steps: int, method: str, work: Path) -> dict:
    out = work / f"{checkout.name}-{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": str(checkout / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "bayes_adalora.cli", "train", "--task", "sst2", "--data-dir", str(glue),
               "--method", method, "--max-steps", str(steps), "--eval-steps", str(steps), "--max-eval-samples", "64",
               "--max-length", "64", "--batch-size", "32", "--no-progress", "--no-plots", "--no-log-correlations",
               "--output-dir", str(out)]
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, text=True, cwd=checkout)
    wall = time.perf_counter() - started
    results = json.loads((out / "results.json").read_text())
    return {"seconds_per_step": results["seconds_per_step"], "wall_seconds": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout to compare with")
    parser.add_argument("--glue-dir", type=Path, default=Path(os.environ.get("GLUE_DIR", "glue")))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--method", default="bayes-adalora")
    args = parser.parse_args()
    checkouts = {"this": HERE, "baseline": args.baseline.resolve()}
    runs = {name: [] for name in checkouts}
    with tempfile.TemporaryDirectory() as work:
        for _ in range(args.repeats):
            for name, checkout in checkouts.items():
                runs[name].append(run(checkout, args.glue_dir, args.steps, args.method, Path(work)))
                print(name, runs[name][-1], flush=True)
    median = {name: {key: statistics.median(r[key] for r in rs) for key in ("seconds_per_step", "wall_seconds")}
              for name, rs in runs.items()}
    commits = {name: subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=c, capture_output=True,
                                    text=True).stdout.strip() for name, c in checkouts.items()}
    report = {"method": args.method, "steps": args.steps, "repeats": args.repeats, "commits": commits,
              "median": median, "runs": runs,
              "ratio_seconds_per_step": median["this"]["seconds_per_step"] / median["baseline"]["seconds_per_step"],
              "ratio_wall": median["this"]["wall_seconds"] / median["baseline"]["wall_seconds"]}
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("commits", "median", "ratio_seconds_per_step", "ratio_wall")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
