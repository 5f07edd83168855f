"""Mini-GLUE v2's plumbing offline with the tiny model, and its statistics against scipy's paired t-test."""

import contextlib
import io
import json
import math
import sys
from pathlib import Path

import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mini_glue_v2 as grid
from bayes_adalora import cli

TINY_FLAGS = "--tinit 1 --tfinal 2 --delta-t 1 --warmup-steps 1 --per-device-eval-batch-size 16"


def write_cell(results: Path, task: str, cell: str, seed: int, best: float) -> None:
    path = grid.cell_path(results, task, cell, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seed": seed, "best": best, "commit": "abc"}))


def test_paired_interval_is_scipys_paired_t_interval(tmp_path):
    bayes, adalora = [0.81, 0.84, 0.80, 0.83], [0.80, 0.81, 0.805, 0.80]
    for seed, (b, a) in enumerate(zip(bayes, adalora)):
        write_cell(tmp_path, "sst2", "bayes-adalora", seed, b)
        write_cell(tmp_path, "sst2", "adalora", seed, a)
    got = grid.paired(tmp_path, "sst2", "bayes-adalora", "adalora", range(4))
    ci = stats.ttest_rel(bayes, adalora).confidence_interval(0.95)
    assert got["n"] == 4
    assert got["low"] == pytest.approx(ci.low, abs=1e-12) and got["high"] == pytest.approx(ci.high, abs=1e-12)
    assert got["significant"] == (ci.low > 0 or ci.high < 0)


def test_more_seeds_only_where_the_difference_is_within_one_and_a_half_standard_errors(tmp_path):
    # differences 0.01, 0.03, -0.01: mean 0.01, sd 0.02, se 0.0115 -> 0.87 se: run seeds 3-4
    for seed, (b, a) in enumerate([(0.81, 0.80), (0.83, 0.80), (0.79, 0.80)]):
        write_cell(tmp_path, "mrpc", "bayes-adalora", seed, b)
        write_cell(tmp_path, "mrpc", "adalora", seed, a)
    assert grid.needs_more_seeds(tmp_path, "mrpc")
    # differences 0.02, 0.03, 0.025: mean 0.025, se 0.0029 -> 8.7 se: three seeds decide
    for seed, (b, a) in enumerate([(0.82, 0.80), (0.83, 0.80), (0.825, 0.80)]):
        write_cell(tmp_path, "rte", "bayes-adalora", seed, b)
        write_cell(tmp_path, "rte", "adalora", seed, a)
    assert not grid.needs_more_seeds(tmp_path, "rte")


def write_tune(results: Path, family: str, lr: float, best: float | None) -> None:
    path = grid.tune_path(results, "sst2", family, lr)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"lr": lr, **({"best": best} if best is not None else {"diverged": "at step 3"})}))


def test_a_best_rung_at_a_ladder_s_edge_gives_every_family_one_more_rung_by_one_rule(tmp_path, glue_dir,
                                                                                     monkeypatch):
    monkeypatch.setattr(grid, "TUNE_TASKS", ("sst2",))
    monkeypatch.setattr(grid, "LADDERS", {"ivon": (1.5, 3.0, 6.0, 12.0), "adalora": (1e-3, 2e-3, 4e-3, 8e-3)})
    monkeypatch.setattr(grid, "EXTRA_ROUNDS", 2)
    for lr, v in zip(grid.LADDERS["ivon"], (0.82, 0.85, 0.86, 0.55)):
        write_tune(tmp_path, "ivon", lr, v)
    for lr, v in zip(grid.LADDERS["adalora"][:3], (0.85, 0.86, 0.87)):
        write_tune(tmp_path, "adalora", lr, v)
    assert grid.chosen_lrs(tmp_path) is None  # adalora's 8e-3 has not run
    write_tune(tmp_path, "adalora", 8e-3, 0.874)
    # adalora's best is its top rung: a round for both, a doubling for adalora, for ivon (best 6, inside)
    # the log midpoint towards its better neighbour 3
    assert grid.ladders(tmp_path) == ({"ivon": (1.5, 3.0, 6.0, 12.0, 4.24), "adalora": (1e-3, 2e-3, 4e-3, 8e-3, 0.016)},
                                      False)
    assert grid.chosen_lrs(tmp_path) is None
    jobs = [r for _, _, r in grid.jobs(tmp_path, tmp_path / "w", glue_dir, None, []) if "lr" in r]
    assert {(r["family"], r["lr"]) for r in jobs} >= {("ivon", 4.24), ("adalora", 0.016)}
    write_tune(tmp_path, "ivon", 4.24, 0.861)
    write_tune(tmp_path, "adalora", 0.016, None)  # diverged: 8e-3 stays the best, no longer the edge
    assert grid.chosen_lrs(tmp_path) == {"ivon": 4.24, "adalora": 8e-3}
    assert grid.tuning_table(tmp_path)["adalora"] == {1e-3: 0.85, 2e-3: 0.86, 4e-3: 0.87, 8e-3: 0.874, 0.016: None}
    # had 0.016 won, one more round (the last of EXTRA_ROUNDS = 2); then a choice at an edge stands, flagged
    write_tune(tmp_path, "adalora", 0.016, 0.88)
    assert grid.ladders(tmp_path)[0]["adalora"][-1] == 0.032 and grid.ladders(tmp_path)[0]["ivon"][-1] == 5.04
    write_tune(tmp_path, "adalora", 0.032, 0.89)
    write_tune(tmp_path, "ivon", 5.04, 0.85)
    assert grid.chosen_lrs(tmp_path) == {"ivon": 4.24, "adalora": 0.032}
    assert grid.at_edge(grid.ladders(tmp_path)[0]["adalora"], 0.032)


def test_heldout_split_partitions_the_training_file_and_keeps_the_header(tmp_path, glue_dir):
    root = grid.heldout_dir(tmp_path, glue_dir, "sst2")
    original = (glue_dir / "SST-2" / "train.tsv").read_text().splitlines()
    train = (root / "SST-2" / "train.tsv").read_text().splitlines()
    dev = (root / "SST-2" / "dev.tsv").read_text().splitlines()
    assert train[0] == dev[0] == original[0]
    assert sorted(train[1:] + dev[1:]) == sorted(original[1:])  # every row once, in one part or the other
    assert len(dev) - 1 == (len(original) - 1) // 10


def test_learned_needs_the_margin_over_the_baseline_or_the_floor():
    assert grid.learned("mrpc", 0.8123 + 0.05, 0.8122) and not grid.learned("mrpc", 0.85, 0.8122)
    assert not grid.learned("cola", 0.14, 0.0) and grid.learned("cola", 0.15, 0.0)
    assert not grid.learned("stsb", 0.69, 0.0) and not grid.learned("rte", None, 0.527)


def train_in_process(args: list[str], threads: int) -> tuple[int, str]:
    """`run_train` without the subprocess (8 interpreters starting torch would cost a minute)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(args)
    return code, err.getvalue()


def test_a_cell_runs_in_a_subprocess_with_this_checkouts_package(tmp_path, glue_dir, tiny_deberta):
    args = grid.train_args("sst2", grid.CELLS["bayes-adalora"], 0, 0.5, glue_dir, tmp_path / "run",
                           ["--model", str(tiny_deberta), "--max-steps", "4", "--eval-steps", "2", *TINY_FLAGS.split()])
    record = grid.run_cell(args, {"cell": "bayes-adalora"}, tmp_path / "cell.json", threads=1)
    assert record["steps"] == 4 and json.loads((tmp_path / "cell.json").read_text()) == record
    run_config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run_config["criterion"] == "snr_abs" and run_config["learning_rate"] == 0.5
    bad = [*args, "--learning-rate", "-1", "--output-dir", str(tmp_path / "bad")]
    code, stderr = grid.run_train(bad, threads=1)  # bad input: one sentence, exit 2
    assert code == 2 and "--learning-rate" in stderr


def test_grid_tunes_runs_cells_resumes_and_reports(tmp_path, glue_dir, tiny_deberta, monkeypatch, capsys):
    monkeypatch.setattr(grid, "run_train", train_in_process)
    monkeypatch.setattr(grid, "TASKS", {"sst2": grid.TaskPlan(steps=6, max_length=32, eval_times=2)})
    # two families, one rung each, two seeds: 8 runs in all
    monkeypatch.setattr(grid, "LADDERS", {"ivon": (0.5,), "adalora": (1e-3,)})
    monkeypatch.setattr(grid, "CORE", (grid.CELLS["adalora"], grid.CELLS["bayes-adalora"]))
    monkeypatch.setattr(grid, "TUNE_TASKS", ("sst2",))
    monkeypatch.setattr(grid, "ABLATION_TASKS", ("sst2",))
    monkeypatch.setattr(grid, "ABLATION", (grid.CELLS["bayes-inv_sigma"],))
    monkeypatch.setattr(grid, "CELLS", {c.name: c for c in (*grid.CORE, grid.CELLS["bayes-inv_sigma"])})
    monkeypatch.setattr(grid, "SEEDS", (0, 1))
    monkeypatch.setattr(grid, "EXTRA_SEEDS", ())
    results, out = tmp_path / "results", tmp_path / "out"
    argv = ["--glue-dir", str(glue_dir), "--results", str(results), "--out", str(out), "--work", str(tmp_path / "w"),
            "--extra-args", f"--model {tiny_deberta} {TINY_FLAGS}"]
    assert grid.main(argv) == 0
    # 2 tuning cells, then 2 core cells x 2 seeds, then the ablation cell x 2 seeds
    cells = sorted(p.relative_to(results).as_posix() for p in results.rglob("*.json"))
    assert len(cells) == 2 + 4 + 2 and "cells/sst2/bayes-inv_sigma-seed1.json" in cells
    record = json.loads(grid.cell_path(results, "sst2", "bayes-adalora", 1).read_text())
    assert record["lr"] == 0.5 and record["seed"] == 1 and record["steps"] == 6 and record["commit"]
    assert record["command"].startswith(
        "bayes-adalora train --task sst2 --method bayes-adalora --seed 1 --learning-rate 0.5")
    assert f"--model {tiny_deberta}" in record["command"]
    tune = json.loads(grid.tune_path(results, "sst2", "ivon", 0.5).read_text())
    assert tune["seed"] == grid.TUNE_SEED and "/heldout" in tune["command"]

    summary = json.loads((out / "mini-glue-v2.json").read_text())
    task = summary["tasks"]["sst2"]
    assert task["baseline"] == pytest.approx(0.5)  # the tiny dev set alternates its two labels
    assert task["methods"]["bayes-adalora"]["n"] == 2 and task["seeds"] == [0, 1]
    scores = [json.loads(grid.cell_path(results, "sst2", c, s).read_text())["best"]
              for c in ("bayes-adalora", "adalora") for s in (0, 1)]
    diff = task["paired"]["bayes-adalora"]
    assert diff["mean"] == pytest.approx((scores[0] - scores[2] + scores[1] - scores[3]) / 2)
    md = (out / "mini-glue-v2.md").read_text()
    assert "| sst2 | accuracy | 0.5000 |" in md and summary["commits"][0] in md
    assert (out / "mini-glue-v2.png").stat().st_size > 0

    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*.json")}
    assert grid.main(argv) == 0  # resumable: every cell is on disk, nothing is trained again
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*.json")} == before
    assert not math.isnan(summary["tasks"]["sst2"]["methods"]["bayes-inv_sigma"]["mean"])


def test_a_task_is_not_run_then_pending_until_adalora_has_its_seeds():
    assert grid.learned_status({"methods": {}, "learned": False}) == "not run"
    some = {"methods": {"lora": {"n": 1}}, "learned": False}
    assert grid.learned_status(some) == "pending (0 of 3 adalora seeds)"
    done = {"methods": {"adalora": {"n": 3}}}
    assert grid.learned_status({**done, "learned": True}) == "yes"
    assert grid.learned_status({**done, "learned": False}) == "no"


def test_the_gpu_plan_runs_five_seeds_of_longer_cells_and_reports_beside_the_cpu_table(tmp_path, glue_dir,
                                                                                     monkeypatch):
    for name in ("TASKS", "SEEDS", "EXTRA_SEEDS", "COMMON", "NAME", "NOTE"):
        monkeypatch.setattr(grid, name, getattr(grid, name))  # use_plan sets them; restored after the test
    lrs = {"ivon": 4.0, "adalora": 4e-3, "lora": 1e-3}
    grid.use_plan("gpu")
    jobs = [(path, args, record) for path, args, record in grid.jobs(tmp_path, tmp_path / "w", glue_dir, lrs, [])
            if "cell" in record and "seed" in record and "family" not in record]
    assert {r["seed"] for _, _, r in jobs} == {0, 1, 2, 3, 4}  # every cell, every task, five seeds; none extra
    assert len(jobs) == 5 * (5 * len(grid.CORE) + len(grid.ABLATION_TASKS) * len(grid.ABLATION))
    sst2 = next(a for _, a, r in jobs if r["task"] == "sst2")
    assert sst2[sst2.index("--max-steps") + 1] == "2105"
    assert sst2[sst2.index("--per-device-eval-batch-size") + 1] == "256"
    write_cell(tmp_path, "sst2", "adalora", 0, 0.8)
    monkeypatch.setattr(grid, "trivial_baseline", lambda task, glue, metric: 0.5)  # the fixture has 2 tasks
    md = grid.markdown(grid.summarize(tmp_path, str(glue_dir)))
    assert md.startswith("# Mini-GLUE v2 on a GPU") and "1 of the 135 planned cells (seeds 0-4)" in md
    assert "sst2 2105 steps" in md and "travelled to the GPU as fp16" in md and "Cut to fit" not in md
    assert "Cost: 1 cells and 0 tuning runs took 0.0 hours of one thread" in md
    assert "Batch 32, fp32, one thread per cell, machine not recorded." in md  # rebuilt here: no GPU of its own
    grid.use_plan("cpu")  # and back: the CPU table's plan is the module's default
    assert grid.TASKS["sst2"].steps == 300 and grid.SEEDS == (0, 1, 2) and grid.NAME == "mini-glue-v2"
    assert grid.COMMON[grid.COMMON.index("--per-device-eval-batch-size") + 1] == "64" and grid.NOTE == grid.CPU_CUT


def test_the_ablation_is_paired_against_the_cell_it_differs_from_in_one_thing(tmp_path, glue_dir, monkeypatch):
    monkeypatch.setattr(grid, "trivial_baseline", lambda task, glue, metric: 0.5)
    scores = {"adalora": [0.80, 0.82, 0.81], "bayes-adalora": [0.79, 0.80, 0.83],
              "bayes-snr": [0.78, 0.81, 0.80], "adalora-lambda-paper": [0.81, 0.82, 0.83],
              "bayes-mean_abs": [0.79, 0.80, 0.83]}  # the same masks as snr_abs: equal scores
    for cell, values in scores.items():
        for seed, value in enumerate(values):
            write_cell(tmp_path, "sst2", cell, seed, value)
    task = grid.summarize(tmp_path, str(glue_dir))["tasks"]["sst2"]
    snr = task["paired_reference"]["bayes-snr"]  # the criterion against snr_abs, both with IVON
    assert snr["mean"] == pytest.approx((-0.01 + 0.01 - 0.03) / 3)
    assert task["paired_reference"]["adalora-lambda-paper"]["mean"] == pytest.approx(0.01)  # against adalora
    assert task["paired"]["bayes-snr"]["mean"] == pytest.approx((-0.02 - 0.01 - 0.01) / 3)  # the table above it
    md = grid.markdown(grid.summarize(tmp_path, str(glue_dir)))
    header = "| task | bayes-snr - bayes-adalora | bayes-mean_abs - bayes-adalora | adalora-lambda-paper - adalora |"
    assert header in md
    assert f"{snr['mean']:+.4f} [{snr['low']:+.4f}, {snr['high']:+.4f}] (n=3)" in md
    assert "| +0.0000 [+0.0000, +0.0000] (n=3) |" in md  # equal scores: no "-0.0000" from rounding
