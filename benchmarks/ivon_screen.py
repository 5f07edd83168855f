"""A first screen of IVON settings for a posterior that moves within a short run, on held-out data.

Each arm is one `bayes-adalora train` run on a held-out 10% of a task's *training* file (the split of
`mini_glue_v2.heldout_dir`; the dev sets are not looked at), seed 100, with the posterior predictive over
16 draws at the end. Per run it keeps the task metrics, ECE/NLL/Brier (point and MC) and the spread of
IVON's sigma (p01, median, p99 over every P, lambda and Q entry) at the first and the last masking step.
A run whose JSON exists is skipped, so the screen resumes.

    python benchmarks/ivon_screen.py --glue-dir ../shared/data/glue --work /tmp/screen [--jobs 2]
    python benchmarks/ivon_screen.py --report

`--report` writes `results/ivon-screen.md` and the README's figure `results/ivon-screen.png` (accuracy and
ECE of AdaLoRA with AdamW, the paper's IVON settings and this version's defaults) from the JSON files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mini_glue_v2 import git_commit, heldout_dir  # noqa: E402

RESULTS = HERE / "results" / "ivon-screen"
STEPS, MAX_LENGTH, SEED, MC = 200, 64, 100, 16
TASKS = {"mrpc": [], "sst2": ["--max-eval-samples", "2000"], "stsb": []}
# arm -> flags; the v2 settings are the defaults of the commit the screen started at
# Round 1 showed that a Hessian that follows the data (beta2 auto) at ess = the training-set size lets sigma
# grow to 0.24 on P and Q (whose curvature is ~0 while lambda is small), and the sampled training loss rose
# from 0.8 to 28: in a quadratic model the draws cost up to (trainable parameters) / (2 ess) nats, 38 here.
# Round 2 tempers: ess = 10x the trainable parameters (254,432 on MRPC), which caps that cost at 0.05 nats,
# with IVON's initial Hessian lowered so the data outweighs it by the first masking step (and lr raised
# by as much, so the clipped step lr * hess_init * clip_radius stays v2's).
ESS_10P = ["--ivon-ess", "2.5e6"]
ARMS = {
    "adalora": ["--method", "adalora", "--no-log-correlations"],
    "v2": [],
    "beta2-auto": ["--ivon-beta2", "auto"],
    "auto-ess10p": ["--ivon-beta2", "auto", *ESS_10P],
    "auto-ess10p-h0.1": ["--ivon-beta2", "auto", *ESS_10P, "--ivon-hess-init", "0.1", "--learning-rate", "30"],
    "auto-ess10p-h0.01": ["--ivon-beta2", "auto", *ESS_10P, "--ivon-hess-init", "0.01", "--learning-rate", "300"],
}
# (task, arm) in the order they run. Round 3: does round 2's best MRPC arm carry to SST-2 and STS-B, and does a
# smaller initial Hessian (h 0.01) make sigma vary at the first masking step on MRPC? (It did: p99/p01 3.29, with
# accuracy level with adalora's; so h 0.01 on SST-2 and STS-B next.)
ROUNDS = [*(("mrpc", arm) for arm in ARMS if arm != "auto-ess10p-h0.01"),
          ("sst2", "adalora"), ("sst2", "auto-ess10p-h0.1"), ("sst2", "auto-ess10p"), ("mrpc", "auto-ess10p-h0.01"),
          ("stsb", "adalora"), ("sst2", "auto-ess10p-h0.01"), ("stsb", "auto-ess10p-h0.01"),
          ("stsb", "auto-ess10p-h0.1"), ("sst2", "v2"), ("stsb", "v2")]
IVON_FLAGS = ["--mc-samples", str(MC)]


def run(task: str, arm: str, glue: Path, work: Path) -> dict | None:
    path = RESULTS / f"{task}-{arm}.json"
    if path.exists():
        return json.loads(path.read_text())
    out = work / f"{task}-{arm}"
    args = ["train", "--task", task, "--seed", str(SEED), "--max-steps", str(STEPS), "--max-length", str(MAX_LENGTH),
            "--eval-steps", str(STEPS), "--data-dir", str(heldout_dir(work, glue, task)), "--output-dir", str(out),
            "--overwrite", "--no-plots", "--no-progress", *TASKS[task], *ARMS[arm]]
    if arm != "adalora":
        args += IVON_FLAGS
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE.parent / "src")}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "bayes_adalora.cli", *args], env=env, capture_output=True, text=True)
    record = {"task": task, "arm": arm, "command": " ".join(["bayes-adalora", *args]), "commit": git_commit(),
              "wall_seconds": round(time.time() - start, 1)}
    if proc.returncode != 0:
        record["failed"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
    else:
        results = json.loads((out / "results.json").read_text())
        history = json.loads((out / "history.json").read_text())
        record.update(metrics=results["metrics"], sigma=history.get("sigma", []),
                      loss_curve=history["loss"][:: max(1, STEPS // 20)])
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def report() -> str:
    lines = ["| task | arm | accuracy (STS-B: Pearson) | f1 | ECE point / MC | NLL point / MC | "
             "sigma p99/p01 first / last mask | lambda's sigma p99/p01 first / last |",
             "|---|---|---|---|---|---|---|---|"]
    for task in TASKS:
        for arm in ARMS:
            path = RESULTS / f"{task}-{arm}.json"
            if not path.exists():
                continue
            r = json.loads(path.read_text())
            if "failed" in r:
                lines.append(f"| {task} | {arm} | failed: {r['failed']} | | | | | |")
                continue
            final, mc = r["metrics"]["final"], r["metrics"].get("mc", {})
            ratio = " / ".join(f"{s['sigma/all/p99'] / s['sigma/all/p01']:.2f}" for s in r["sigma"]) or "-"
            lam = " / ".join(f"{s['sigma/lambda/p99'] / s['sigma/lambda/p01']:.1f}" for s in r["sigma"]) or "-"
            fmt = lambda d, k: f"{d[k]:.4f}" if k in d else "-"  # noqa: E731
            main = "accuracy" if "accuracy" in final else "pearson"
            lines.append(f"| {task} | {arm} | {fmt(final, main)} | {fmt(final, 'f1')} | "
                         f"{fmt(final, 'ece')} / {fmt(mc, 'ece')} | {fmt(final, 'nll')} / {fmt(mc, 'nll')} | "
                         f"{ratio} | {lam} |")
    return "\n".join(lines) + "\n"


FIGURE_ARMS = {"adalora": "AdaLoRA + AdamW", "v2": "bayes-adalora, the paper's IVON settings",
               "auto-ess10p-h0.1": "bayes-adalora, this version's defaults"}


def figure(path: Path) -> None:
    """Accuracy and ECE (posterior mean) on the held-out data of MRPC and SST-2, per arm: the README's figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = ("mrpc", "sst2")
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    width = 0.8 / len(FIGURE_ARMS)
    for panel, (metric, label) in zip(axes, (("accuracy", "accuracy"), ("ece", "ECE (lower is better)"))):
        for i, (arm, name) in enumerate(FIGURE_ARMS.items()):
            xs, ys = [], []
            for t, task in enumerate(tasks):
                file = RESULTS / f"{task}-{arm}.json"
                if file.exists():
                    xs.append(t + (i - 1) * width)
                    ys.append(json.loads(file.read_text())["metrics"]["final"][metric])
            bars = panel.bar(xs, ys, width, label=name)
            panel.bar_label(bars, fmt="%.3f", fontsize=7)
        panel.set_xticks(range(len(tasks)), [t.upper().replace("SST2", "SST-2") for t in tasks])
        panel.set_title(label, fontsize=10)
        if metric == "accuracy":
            panel.set_ylim(0.6, 1.0)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.text(0.5, 0.01, "held-out tenth of each training file, MiniLM, 200 steps, seed 100 "
             "(the paper's settings were screened on MRPC only)", ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue-dir", type=Path, default=Path(os.environ.get("GLUE_DIR", "../shared/data/glue")))
    parser.add_argument("--work", type=Path, default=Path("/tmp/ivon-screen"))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    if not args.report:
        todo = ROUNDS
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda ta: run(*ta, args.glue_dir, args.work), todo))
    text = report()
    (RESULTS.parent / "ivon-screen.md").write_text(text)
    figure(RESULTS.parent / "ivon-screen.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
