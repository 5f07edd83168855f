"""Mini-GLUE v3's plan, resume, statistics and goals on hand-made cells, and one real cell through the CLI."""

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mini_glue_v3 as grid
from bayes_adalora import cli

TINY_FLAGS = ["--tinit", "1", "--tfinal", "2", "--delta-t", "1", "--warmup-steps", "1",
              "--per-device-eval-batch-size", "16"]
TWO_TASKS = {t: grid.TASKS[t] for t in ("sst2", "stsb")}  # the tasks the glue_dir fixture has


def write_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def fake_record(judged: float, ece: float = 0.1, nll: float = 0.5, mc: dict | None = None, spread: float = 4.0,
                metric: str = "accuracy") -> dict:
    final = {metric: judged, "ece": ece, "nll": nll, "brier": 0.2, "aurc": 0.1}
    record = {"metric": metric, "best": judged, "final": judged, "train_seconds": 1, "wall_seconds": 2.0,
              "commit": "abc", "machine": "test CPU", "metrics": {"final": final, "best": {**final, "step": 3}}}
    if mc is not None:
        record["metrics"]["mc"] = {metric: judged, "brier": 0.2, "aurc": 0.1, "samples": 16, **mc}
        lam = {"sigma/lambda/p01": 0.001, "sigma/lambda/p99": 0.05}  # lambda's entries alone: 50-fold
        record["sigma"] = [{"step": 2, "sigma/all/p01": 0.01, "sigma/all/median": 0.02, "sigma/all/p99": 0.01 * spread,
                            **lam}, {"step": 4, "sigma/all/p01": 0.01, "sigma/all/median": 0.03, "sigma/all/p99": 0.05,
                                     **lam}]
    return record


def finish_sweep(results: Path, tasks, families, best: dict[str, float] | None = None) -> None:
    """Every rung of `families` on `tasks` run, the middle one best unless `best` names another."""
    for task in tasks:
        for family in families:
            for lr in grid.LADDERS[family]:
                score = 0.9 if lr == (best or {}).get(family, grid.LADDERS[family][1]) else 0.8
                write_record(grid.tune_path(results, task, family, lr),
                             fake_record(score, metric=grid.JUDGED[task].metric))


def test_jobs_come_in_the_plans_order_and_cells_wait_for_their_sweep(tmp_path, glue_dir, monkeypatch):
    monkeypatch.setattr(grid, "TASKS", TWO_TASKS)
    work = tmp_path / "w"

    def listing():
        return [(r["stage"], r["task"], r["cell"], r.get("family"), r["seed"])
                for _, _, r in grid.jobs(tmp_path, work, glue_dir, None, [])]

    before = listing()  # nothing tuned: only the sweeps (bayes-adalora-v2's fixed lr does not jump the queue)
    assert {s for s, *_ in before} == {"tune"} and len(before) == 2 * 2 * 3 + 2 * 3  # adalora+ivon, then lora
    finish_sweep(tmp_path, ("sst2",), ("adalora", "ivon"))
    partly = [(s, t, c) for s, t, c, *_ in listing() if s != "tune"]  # lora waits for its own sweep
    assert {(s, t) for s, t, _ in partly} == {("core", "sst2"), ("ablation", "sst2"), ("extra", "sst2")}
    assert "lora" not in {c for *_, c in partly} and "bayes-snr" in {c for *_, c in partly}
    finish_sweep(tmp_path, ("sst2", "stsb"), ("adalora", "ivon", "lora"))
    jobs = listing()
    stages = [s for s, *_ in jobs]
    # tune (12), core seeds 0-2 (12), ablation (24), lora's tuning (6), lora (6), bayes-snr (6), seeds 3-4 (8)
    expected = ["tune"] * 12 + ["core"] * 12 + ["ablation"] * 24 + ["tune"] * 6 + ["ablation"] * 12 + ["extra"] * 8
    assert stages == expected
    core = [j for j in jobs if j[0] == "core"]
    assert [j[4] for j in core] == [0] * 4 + [1] * 4 + [2] * 4  # seed by seed: 3 seeds of every task come early
    assert {j[2] for j in jobs if j[0] == "extra"} == {"adalora", "bayes-adalora"}
    assert {j[4] for j in jobs if j[0] == "extra"} == {3, 4}
    assert {j[2] for j in jobs[24:48]} == {"adalora-ivon", "bayes-mean_abs", "bayes-inv_sigma", "bayes-adalora-v2"}
    assert [j[2] for j in jobs[-14:-8]] == ["bayes-snr"] * 6
    assert len(grid.planned_cells()) == len([s for s in stages if s != "tune"])


def test_every_arm_gets_its_flags_and_the_new_defaults_live_in_one_constant(tmp_path, monkeypatch):
    monkeypatch.setattr(grid, "NEW_IVON", ("--ivon-beta2", "auto", "--ivon-weight-decay", "0.01"))
    args = grid.train_args("sst2", grid.ARMS["bayes-inv_sigma"], 1, 2.0, tmp_path, tmp_path / "o", [])
    assert args[args.index("--ivon-weight-decay") + 1] == "0.01" and args[args.index("--criterion") + 1] == "inv_sigma"
    assert args[args.index("--mc-samples") + 1] == "16" and args[args.index("--max-steps") + 1] == "300"
    v2_args = grid.train_args("sst2", grid.ARMS["bayes-adalora-v2"], 1, 4.24, tmp_path, tmp_path / "o", [])
    assert v2_args[v2_args.index("--ivon-beta2") + 1] == "0.99999" and "0.01" not in v2_args
    assert "--ivon-beta2" not in grid.ARMS["adalora"].flags() and "--mc-samples" not in grid.ARMS["lora"].flags()
    tune = grid.train_args("mrpc", grid.ARMS["bayes-adalora"], 100, 4.0, tmp_path, tmp_path / "o", [], tuning=True)
    assert "--mc-samples" not in tune and tune[tune.index("--eval-steps") + 1] == "345"
    assert tune[tune.index("--max-eval-samples") + 1] == str(grid.TUNE_EVAL_CAP)


def test_the_grid_resumes_an_existing_cell_is_not_run_again(tmp_path, glue_dir, monkeypatch):
    monkeypatch.setattr(grid, "TASKS", {"sst2": grid.TASKS["sst2"]})
    monkeypatch.setattr(grid, "LADDERS", {"adalora": (1e-3,), "ivon": (1.0,), "lora": (1e-3,)})
    monkeypatch.setattr(grid, "EXTRA_SEEDS", ())
    monkeypatch.setattr(grid, "PLAN", (grid.Tune(("adalora", "ivon")), grid.Cells("core", ("adalora", "bayes-adalora"),
                                                                                   None, (0, 1))))
    ran = []

    def run_cell(args, record, path, threads):
        ran.append(path.relative_to(tmp_path).as_posix())
        done = fake_record(0.8, mc={"ece": 0.05, "nll": 0.4} if record["cell"] != "adalora" else None)
        write_record(path, {**record, **done})
        return done

    monkeypatch.setattr(grid, "run_cell", run_cell)
    write_record(grid.cell_path(tmp_path, "sst2", "adalora", 1), {**fake_record(0.7), "seed": 1})  # already there
    grid.run_grid(tmp_path, tmp_path / "w", glue_dir, 1, None, [])
    assert ran == ["tune/sst2/adalora-lr0.001.json", "tune/sst2/ivon-lr1.json", "cells/sst2/adalora-seed0.json",
                   "cells/sst2/bayes-adalora-seed0.json", "cells/sst2/bayes-adalora-seed1.json"]
    assert json.loads(grid.cell_path(tmp_path, "sst2", "adalora", 1).read_text())["final"] == 0.7  # untouched
    ran.clear()
    grid.run_grid(tmp_path, tmp_path / "w", glue_dir, 1, None, [])
    assert ran == []


def test_paired_interval_on_hand_numbers():
    # differences 0.01, 0.04, 0.01 (seed 3 has no partner): mean 0.02, sd sqrt(0.0003), se 0.01, t(0.975, 2) 4.3027
    got = grid.paired_interval({0: 0.80, 1: 0.84, 2: 0.83, 3: 0.9}, {0: 0.79, 1: 0.80, 2: 0.82})
    assert got["n"] == 3 and got["mean"] == pytest.approx(0.02)
    assert got["low"] == pytest.approx(0.02 - 0.043026527, abs=1e-8)
    assert got["high"] == pytest.approx(0.02 + 0.043026527, abs=1e-8)
    assert not got["significant"]
    assert grid.paired_interval({0: 0.8}, {0: 0.7}) is None  # one pair: no interval


def test_learned_rule_per_task():
    assert grid.learned("mrpc", 0.7340, 0.6838) and not grid.learned("mrpc", 0.7330, 0.6838)  # accuracy + 0.05
    assert grid.learned("cola", 0.10, 0.0) and not grid.learned("cola", 0.099, 0.0)  # MCC floor
    assert grid.learned("stsb", 0.70, 0.0) and not grid.learned("stsb", 0.69, 0.0)  # Pearson floor
    assert grid.learned("sst2", 0.56, 0.5092) and not grid.learned("sst2", 0.55, 0.5092)
    assert not grid.learned("sst2", None, 0.5)
    assert grid.JUDGED["mrpc"].metric == "accuracy" and grid.JUDGED["cola"].metric == "matthews_correlation"


FOUR = ("sst2", "stsb", "mrpc", "cola")


def write_grid(results: Path, adalora: dict, bayes: dict, spread: float, seeds=range(5)) -> None:
    """adalora / bayes: task -> (judged, ece, nll) lists per seed; bayes's nll and ece are its MC ones."""
    for task in FOUR:
        metric = grid.JUDGED[task].metric
        for s in seeds:
            a, b = adalora[task][s], bayes[task][s]
            write_record(grid.cell_path(results, task, "adalora", s),
                         {**fake_record(a[0], a[1], a[2], metric=metric), "seed": s})
            write_record(grid.cell_path(results, task, "bayes-adalora", s),
                         {**fake_record(b[0], 0.3, 0.9, mc={"ece": b[1], "nll": b[2]}, spread=spread, metric=metric),
                          "seed": s})


def goals_of(results: Path, glue_dir) -> dict:
    return grid.summarize(results, str(glue_dir))["goals"]


def test_goals_met_and_missed_on_fabricated_cells(tmp_path, glue_dir, monkeypatch):
    monkeypatch.setattr(grid, "trivial_baseline", lambda task, glue, metric: {"accuracy": 0.5}.get(metric, 0.0))
    monkeypatch.setattr(grid, "constant_train_loss", lambda task, glue: 0.6931)  # the fixture has no MRPC or CoLA
    jitter = (0.0, 0.004, -0.004, 0.002, -0.002)
    adalora = {t: [(0.80 + j, 0.10 + j, 0.50 + j) for j in jitter] for t in FOUR}
    # bayes: the same scores +0.001 in each seed (level), ECE and NLL lower by 0.03 / 0.05 in every seed
    bayes = {t: [(0.801 + j, 0.07 + j, 0.45 + j) for j in jitter] for t in FOUR}
    good = tmp_path / "good"
    write_grid(good, adalora, bayes, spread=4.0)
    goals = goals_of(good, glue_dir)
    assert {k: g["status"] for k, g in goals.items()} == {"sigma varies": "met", "accuracy": "met",
                                                           "calibration": "met", "claim 4": "pending"}
    assert "3 task(s)" in goals["calibration"]["evidence"]  # STS-B has no calibration metric

    # worse: sigma narrow (p99/p01 = 2), bayes 0.005 below on MRPC, calibration lost on MRPC and CoLA
    bad = tmp_path / "bad"
    bayes_bad = {**bayes, "mrpc": [(0.795 + j, 0.12 + j, 0.55 + j) for j in jitter],
                 "cola": [(0.801 + j, 0.12 + j, 0.45 + j) for j in jitter]}
    write_grid(bad, adalora, bayes_bad, spread=2.0)
    goals = goals_of(bad, glue_dir)
    assert {k: g["status"] for k, g in goals.items()} == {"sigma varies": "missed", "accuracy": "missed",
                                                           "calibration": "missed", "claim 4": "missed"}
    assert "fails on mrpc -0.0050" in goals["accuracy"]["evidence"]

    # a task adalora does not learn is left out of the accuracy goal (CoLA MCC 0.05 < 0.10)
    low = tmp_path / "low"
    adalora_low = {**adalora, "mrpc": [(0.40 + j, 0.1, 0.5) for j in jitter]}
    write_grid(low, adalora_low, {**bayes, "mrpc": [(0.30 + j, 0.07, 0.45) for j in jitter]}, spread=4.0)
    summary = grid.summarize(low, str(glue_dir))
    assert summary["tasks"]["mrpc"]["learned_status"] == "no" and summary["goals"]["accuracy"]["status"] == "met"


def test_the_accuracy_goal_needs_the_mean_within_tolerance_and_no_interval_wholly_below_zero():
    def goal(mean, low, high, status="yes"):
        pair = {"n": 5, "mean": mean, "low": low, "high": high, "significant": not low <= 0 <= high}
        return grid.goal_accuracy({"sst2": {"learned_status": status, "paired": {"bayes-adalora": pair}}})["status"]

    assert goal(-0.002, -0.010, 0.006) == "met"
    assert goal(-0.004, -0.012, 0.004) == "missed"  # the interval holds 0, but the mean is 0.004 below
    assert goal(-0.002, -0.003, -0.001) == "missed"  # within the tolerance, but the interval is wholly below 0
    assert goal(-0.05, -0.06, -0.04, status="no") == "not judged: no task learned"
    assert goal(-0.002, -0.010, 0.006, status="pending (1 of 3 adalora seeds)") == "pending"

    def interim(mean, low, high, n):
        pair = {"n": n, "mean": mean, "low": low, "high": high, "significant": not low <= 0 <= high}
        return grid.goal_accuracy({"sst2": {"learned_status": "yes", "paired": {"bayes-adalora": pair}}})["status"]

    assert interim(-0.0135, -0.12, 0.10, n=2) == "pending"  # 2 of 5 seeds: the mean may still move
    assert interim(-0.0135, -0.12, 0.10, n=5) == "missed"


def test_the_calibration_goal_needs_both_nll_and_ece_lower_on_three_tasks():
    lower = {"n": 5, "mean": -0.02, "low": -0.03, "high": -0.01}
    level = {"n": 5, "mean": -0.01, "low": -0.03, "high": 0.01}

    def goal(*pairs):
        tasks = {t: {"calibration": {"nll": nll, "ece": ece}} for t, (nll, ece) in zip(("sst2", "mrpc", "cola"), pairs)}
        return grid.goal_calibration({**tasks, "stsb": {"calibration": None}})["status"]

    assert goal((lower, lower), (lower, lower), (lower, lower)) == "met"
    assert goal((lower, lower), (lower, lower), (lower, level)) == "missed"  # NLL lower on CoLA, ECE not
    assert goal((lower, lower), (lower, lower), (None, None)) == "pending"  # CoLA can still make it
    early = {**level, "n": 2}  # 2 of 5 seeds: more seeds may narrow the interval below 0
    assert goal((lower, lower), (lower, lower), (lower, early)) == "pending"
    assert goal((lower, lower), (level, level), (lower, early)) == "missed"  # MRPC's 5 seeds leave too few tasks


def test_claim4_is_decided_once_its_arms_have_intervals_on_a_sigma_that_varies(tmp_path, glue_dir, monkeypatch):
    monkeypatch.setattr(grid, "trivial_baseline", lambda task, glue, metric: 0.0)
    monkeypatch.setattr(grid, "constant_train_loss", lambda task, glue: 0.6931)  # the fixture has no MRPC or CoLA
    for task in grid.ABLATION_TASKS:
        metric = grid.JUDGED[task].metric
        for s, (ref, mean_abs, inv_sigma) in enumerate([(0.80, 0.80, 0.70), (0.82, 0.83, 0.71), (0.81, 0.81, 0.72)]):
            for arm, v in (("bayes-adalora", ref), ("bayes-mean_abs", mean_abs), ("bayes-inv_sigma", inv_sigma)):
                write_record(grid.cell_path(tmp_path, task, arm, s),
                             {**fake_record(v, mc={"ece": 0.1, "nll": 0.5}, spread=5.0, metric=metric), "seed": s})
    goal = goals_of(tmp_path, glue_dir)["claim 4"]
    assert goal["status"] == "met"
    assert "bayes-inv_sigma below on sst2" in goal["evidence"] and "bayes-mean_abs level on sst2" in goal["evidence"]


def test_the_report_renders_a_partial_grid_with_counts(tmp_path, glue_dir, monkeypatch):
    monkeypatch.setattr(grid, "trivial_baseline", lambda task, glue, metric: 0.5 if metric == "accuracy" else 0.0)
    monkeypatch.setattr(grid, "constant_train_loss", lambda task, glue: 0.6931)
    results, out = tmp_path / "results", tmp_path / "out"
    finish_sweep(results, FOUR, ("adalora", "ivon"), best={"ivon": grid.LADDERS["ivon"][2]})  # ivon best at the top
    write_record(grid.tune_path(results, "mrpc", "ivon", 15.0), fake_record(0.8, mc={}, spread=2.5))  # with sigma
    curves = ([1.0] * 8 + [0.5, 0.3], [0.6] * 10)  # last fifths: 0.4 and 0.6
    for s in (0, 1):
        write_record(grid.cell_path(results, "sst2", "adalora", s),
                     {**fake_record(0.80 + s / 100), "seed": s, "loss_curve": curves[s]})
        write_record(grid.cell_path(results, "sst2", "bayes-adalora", s),
                     {**fake_record(0.81, mc={"ece": 0.05, "nll": 0.4}), "seed": s})
    summary = grid.report(results, str(glue_dir), out)
    md = (out / "mini-glue-v3.md").read_text()
    assert "**Partial:** 4 of the 82 planned cells have run (core 4 of 24, ablation 0 of 42, extra 0 of 16)" in md
    assert "| sst2 | accuracy | 0.5000 | pending (2 of 3 adalora seeds) |" in md
    assert "| cola | matthews_correlation | 0.0000 | not run |" in md
    assert ("`--method bayes-adalora --criterion snr_abs --ivon-ess auto --ivon-beta2 auto --ivon-hess-init 0.1 "
            "--mc-samples 16`") in md
    assert "| sst2 | bayes-adalora | 0.1000 | 0.0500 | 0.5000 | 0.4000 |" in md  # ECE and NLL, point then MC
    assert "| stsb | regression: no NLL or ECE | |" in md
    assert "| sst2 | 0.6931 | 0.5000 | - |" in md  # training loss: input-blind, adalora's last fifths, no curve
    assert "| sigma varies | pending |" in md and "| accuracy | pending |" in md  # sst2's 4.0 alone decides nothing
    assert "| mrpc | 15 | 2.50 (step 2) | 50.0 | 5.00 (step 4) |" in md  # the tuning run's sigma: 0.025/0.01, 0.05/0.01
    # the ivon sweep's best was its top rung: one more round, doubling it; adalora's middle stays inside
    assert grid.ladders(results, "sst2", ("adalora", "ivon"))[0]["ivon"][-1] == 120.0  # 60 x 2
    assert "sst2" not in summary["learning_rates"] or "ivon" not in summary["learning_rates"]["sst2"]
    assert (out / "mini-glue-v3.png").stat().st_size > 10_000
    assert json.loads((out / "mini-glue-v3.json").read_text())["cells_done"] == 4


def test_the_estimate_counts_the_plans_jobs_and_orders_the_stages():
    rows = grid.estimate()
    assert [r["stage"] for r in rows] == ["tune", "core", "ablation", "tune", "ablation", "ablation", "extra"]
    assert [r["jobs"] for r in rows] == [24, 24, 24, 12, 12, 6, 16]
    # an SST-2 adalora cell: 15 s start-up + 300 steps x 1.43 s + 4 dev passes x 18.5 s = 518 s
    assert grid.estimated_seconds("sst2", grid.ARMS["adalora"]) == pytest.approx(518.0)
    # with the MC predictive, 16 passes more: 518 + 296 = 814 s
    assert grid.estimated_seconds("sst2", grid.ARMS["bayes-adalora"]) == pytest.approx(814.0)
    assert 11 < rows[0]["hours"] + rows[1]["hours"] < 13  # the issue's ~12 CPU-hours buy the sweep and 3 seeds


def test_one_cell_through_the_real_cli_keeps_every_metric_the_loss_curve_and_sigma(tmp_path, glue_dir, tiny_deberta):
    extra = ["--model", str(tiny_deberta), "--max-steps", "6", "--eval-steps", "3", "--max-length", "32", *TINY_FLAGS]
    args = grid.train_args("sst2", grid.ARMS["bayes-adalora"], 0, 0.5, glue_dir, tmp_path / "run", extra)
    path = tmp_path / "cell.json"
    record = grid.run_cell(args, {"cell": "bayes-adalora"}, path, threads=1)
    assert json.loads(path.read_text()) == record and record["steps"] == 6
    metrics = record["metrics"]
    assert {"accuracy", "ece", "nll", "brier", "aurc"} <= set(metrics["final"]) and metrics["mc"]["samples"] == 16
    assert len(record["sigma"]) == 2 and record["sigma"][0]["step"] < record["sigma"][1]["step"]
    first = record["sigma"][0]
    assert grid.sigma_spread(record) == first["sigma/all/p99"] / first["sigma/all/p01"]
    assert len(record["loss_curve"]) == 6 and record["loss_every"] == 1
    assert "--ivon-beta2 auto" in record["command"] and record["commit"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["ivon_beta2"] == "auto" and config["criterion"] == "snr_abs"

    # v2's arm: its spelled-out settings are flags the CLI takes, and they are v2's (in-process: no second start-up)
    v2_arm = grid.ARMS["bayes-adalora-v2"]
    args = grid.train_args("sst2", v2_arm, 0, 0.5, glue_dir, tmp_path / "v2", [*extra, "--max-steps", "4"])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main(args) == 0, err.getvalue()[-500:]
    config = json.loads((tmp_path / "v2" / "config.json").read_text())
    assert (config["ivon_beta2"], config["ivon_hess_init"], config["ivon_weight_decay"]) == (0.99999, 1.0, 1e-8)
    assert (config["ivon_beta1"], config["ivon_clip_radius"], config["ivon_ess"]) == (0.9, 1e-3, "train-size")
    assert config["ivon_ess_resolved"] == 64  # 64 rows
