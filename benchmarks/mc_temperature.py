"""Does a wider posterior at prediction time calibrate bayes-adalora's MC predictive? Held-out data only.

Mini-GLUE v3's MC predictive hardly moves from the posterior mean (ECE by at most 0.002): the new IVON defaults size
sigma so that a draw costs little training loss. This asks whether drawing from N(mu, T sigma^2), a posterior
temperature T > 1 at prediction time only, buys calibration, and what it costs in accuracy. It reads the v3 grid's
tuning runs (trained with seed 100 on nine tenths of each training file) at each task's chosen learning rate and
evaluates them on the held-out tenth they were scored on, never on dev: the IVON run's MC predictive at each T
against the AdamW run's point prediction (from its tuning record). Classification tasks only (STS-B has no NLL).

    python benchmarks/mc_temperature.py --work ../grid-v3-runs --temperatures 1,10,100 --draws 8
    python benchmarks/mc_temperature.py --report

Resumable: each (task, T) is written to `results/mc-temperature.json` as it finishes and skipped when there.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from unittest import mock

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import mini_glue_v3 as v3  # noqa: E402

TASKS = ("sst2", "mrpc", "cola")
METRICS = ("judged", "ece", "nll", "brier")  # judged: the task's metric in Mini-GLUE v3 (CoLA: MCC)


def scaled_sigma(original, temperature: float):
    """run_io's posterior_sigma_by_name with every sigma times sqrt(T): draws from N(mu, T sigma^2)."""
    return lambda run, model: {k: v * math.sqrt(temperature) for k, v in original(run, model).items()}


def evaluate_at(run_dir: Path, heldout: Path, temperature: float, draws: int, task: str) -> dict:
    import torch

    from bayes_adalora import run_io

    torch.set_num_threads(1)
    scored = run_io.read_run(run_dir).config.max_eval_samples  # the held-out rows the tuning run was scored on
    with mock.patch.object(run_io, "posterior_sigma_by_name", scaled_sigma(run_io.posterior_sigma_by_name,
                                                                           temperature)):
        out = run_io.evaluate_run(run_dir, data_dir=str(heldout), mc_samples=draws, device="cpu",
                                  max_eval_samples=scored)
    return {"point": pick(out["metrics"]["point"], task), "mc": pick(out["metrics"]["mc"], task)}


def pick(metrics: dict, task: str) -> dict:
    return {m: metrics[v3.JUDGED[task].metric if m == "judged" else m] for m in METRICS}


def run(work: Path, results: Path, out: Path, temperatures: list[float], draws: int) -> dict:
    table = json.loads(out.read_text()) if out.exists() else {"draws": draws, "rows": {}}
    if table["draws"] != draws:
        raise SystemExit(f"{out} holds {table['draws']} draws a row, not {draws}: pass --draws {table['draws']}")
    lrs = v3.chosen_lrs(results)
    for task in TASKS:
        ivon_lr, adalora_lr = lrs[task].get("ivon"), lrs[task].get("adalora")
        if ivon_lr is None or adalora_lr is None:
            print(f"{task}: its sweep is not done; skipped", flush=True)
            continue
        reference = v3.load(v3.tune_path(results, task, "adalora", adalora_lr))
        rows = table["rows"].setdefault(task, {"ivon_lr": ivon_lr, "adalora_lr": adalora_lr,
                                               "adalora_point": pick(reference["metrics"]["final"], task), "mc": {}})
        heldout = work / "heldout"
        for t in temperatures:
            if f"{t:g}" in rows["mc"]:
                continue
            start = time.time()
            got = evaluate_at(work / "tune" / task / f"ivon-lr{ivon_lr:g}", heldout, t, draws, task)
            scored = pick(v3.load(v3.tune_path(results, task, "ivon", ivon_lr))["metrics"]["final"], task)
            if any(abs(got["point"][m] - scored[m]) > 1e-6 for m in METRICS):  # other rows, or another run
                raise SystemExit(f"{task}: the IVON run's point metrics {got['point']} are not its tuning record's "
                                 f"{scored}: --work is not the grid's work folder for --results")
            rows["ivon_point"] = got["point"]
            rows["mc"][f"{t:g}"] = got["mc"]
            tmp = out.with_suffix(".partial")
            tmp.write_text(json.dumps(table, indent=1) + "\n")
            tmp.replace(out)
            print(f"{task} T={t:g}: " + ", ".join(f"{m} {got['mc'][m]:.4f}" for m in METRICS)
                  + f" ({time.time() - start:.0f} s)", flush=True)
    return table


def markdown(table: dict) -> str:
    lines = ["# The MC predictive at a posterior temperature (held-out tenths, prediction time only)", "",
             f"bayes-adalora (new IVON defaults) trained with seed 100 on nine tenths of each training file, at each "
             f"task's chosen learning rate; its MC predictive over {table['draws']} draws from N(mu, T sigma^2), on "
             "the held-out tenth, against the AdamW run's point prediction on the same rows. One run per task: a "
             "reading, not an interval.", "",
             "| task | predictor | judged metric (SST-2, MRPC accuracy; CoLA MCC) | ECE | NLL | Brier |",
             "|---" * (2 + len(METRICS)) + "|"]
    for task, rows in table["rows"].items():
        ref = rows["adalora_point"]
        lines.append(f"| {task} | adalora point (lr {rows['adalora_lr']:g}) | "
                     + " | ".join(f"{ref[m]:.4f}" for m in METRICS) + " |")
        if "ivon_point" in rows:
            lines.append(f"| {task} | bayes-adalora mean (lr {rows['ivon_lr']:g}) | "
                         + " | ".join(f"{rows['ivon_point'][m]:.4f}" for m in METRICS) + " |")
        for t, mc in sorted(rows["mc"].items(), key=lambda kv: float(kv[0])):
            lines.append(f"| {task} | bayes-adalora MC, T {t} | " + " | ".join(f"{mc[m]:.4f}" for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="the v3 grid's work folder (tune/ and heldout/)")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "mini-glue-v3",
                        help="the v3 grid's results (its tuning records choose each task's learning rates)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "mc-temperature.json")
    parser.add_argument("--temperatures", default="1,10,100")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--report", action="store_true", help="only write the table from what has run")
    args = parser.parse_args(argv)
    if args.report:
        table = json.loads(args.out.read_text())
    else:
        if args.work is None:
            parser.error("--work is needed to evaluate (or pass --report)")
        temperatures = [float(t) for t in args.temperatures.split(",")]
        table = run(args.work, args.results, args.out, temperatures, args.draws)
    args.out.with_suffix(".md").write_text(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
