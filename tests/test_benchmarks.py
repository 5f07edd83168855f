"""Plumbing of the benchmark grid, offline with the tiny model: cells, resume, the table."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mini_glue

TINY = ["max_steps=8", "tinit=1", "tfinal=2", "delta_t=2", "max_length=32", "eval_steps=4", "warmup_steps=1"]


@pytest.mark.parametrize("plan", ["mini", "paper"])
def test_grid_runs_every_cell_resumes_and_writes_the_table(plan, tmp_path, glue_dir, tiny_deberta, capsys, monkeypatch):
    monkeypatch.setenv("MINI_GLUE_THREADS", "1")
    # the mini plan sweeps lrs first: a one-rung ladder per family on one task keeps it short
    monkeypatch.setattr(mini_glue, "LR_GRID", {"ivon": (0.5,), "adalora": (1e-3,), "lora": (1e-3,)})
    monkeypatch.setattr(mini_glue, "TUNE_TASKS", ("sst2",))
    seed = "0" if plan == "mini" else "2021"
    args = ["--plan", plan, "--tasks", "sst2", "--seeds", seed, "--glue-dir", str(glue_dir), "--workers", "1",
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
            "--set", f"model={tiny_deberta}", *TINY]
    assert mini_glue.main(args) == 0
    first = capsys.readouterr().out
    assert f"0 cells done, {len(mini_glue.CELLS)} to run" in first
    assert ("0 cells done, 3 to run" in first) == (plan == "mini")  # the sweep, before the grid

    name = "mini-glue" if plan == "mini" else "paper-glue"
    table = json.loads((tmp_path / "out" / f"{name}.json").read_text())
    cells = table["results"]["sst2"]
    assert set(cells) == {c for c, _, _ in mini_glue.CELLS}
    for cell in cells.values():
        assert cell["metric"] == "accuracy" and len(cell["scores"]) == 1
    one = json.loads((tmp_path / "work" / "sst2" / f"bayes-inv_sigma-seed{seed}" / "config.json").read_text())
    assert one["criterion"] == "inv_sigma" and one["max_steps"] == 8 and one["model"] == str(tiny_deberta)
    if plan == "mini":  # the sweep's lrs reach the grid, and the table says what it cost
        assert (one["lr"], one["batch_size"], one["bf16"]) == (0.5, 16, True)
        assert table["learning_rates"] == {"ivon": 0.5, "adalora": 1e-3, "lora": 1e-3}
        assert set(table["wall_seconds"]) == {"tune", "grid"} and all(v > 0 for v in table["wall_seconds"].values())
        assert table["tuning"]["ivon"] == {"0.5": table["results"]["sst2"]["bayes-adalora"]["mean"]}
    if plan == "paper":  # the recipe is applied under the overrides: paper's rank-2 budget and IVON settings
        assert one["recipe"] == "paper" and (one["init_r"], one["target_r"]) == (3, 2)
        assert one["ivon_weight_decay"] == 1e-8 and one["lr"] == 0.4
    md = (tmp_path / "out" / f"{name}.md").read_text()
    assert "| bayes-adalora |" in md and "sst2 (accuracy)" in md
    assert (
        "at or above adalora on" in md
        and "mean rank over tasks" in md
        and "mean_abs minus snr_abs, per task: sst2 " in md
    )

    assert mini_glue.main(args) == 0  # resumable: nothing left to train
    assert f"{len(mini_glue.CELLS)} cells done, 0 to run" in capsys.readouterr().out

    if plan == "mini":  # a variant grid: two cells, another IVON setting, the first grid's sweep reused
        variant = ["--tasks", "sst2", "--seeds", "0", "--glue-dir", str(glue_dir), "--workers", "1",
                   "--work", str(tmp_path / "variant"), "--out", str(tmp_path / "variant-out"),
                   "--cells", "bayes-inv_sigma", "lora", "--tune-dir", str(tmp_path / "work" / "tune"),
                   "--set", f"model={tiny_deberta}", *TINY, "ivon_beta2=0.99"]
        assert mini_glue.main(variant) == 0
        out = capsys.readouterr().out
        assert "3 cells done, 0 to run" in out and "0 cells done, 2 to run" in out
        variant = json.loads((tmp_path / "variant-out" / "mini-glue.json").read_text())
        assert set(variant["results"]["sst2"]) == {"bayes-inv_sigma", "lora"}
        assert variant["learning_rates"] == table["learning_rates"]
        assert (
            json.loads((tmp_path / "variant" / "sst2" / "bayes-inv_sigma-seed0" / "config.json").read_text())[
                "ivon_beta2"
            ]
            == 0.99
        )


def test_a_diverged_cell_is_recorded_and_the_grid_goes_on(tmp_path, glue_dir, tiny_deberta, capsys, monkeypatch):
    # an lr of 1e6 (the --set override beats the sweep's) blows every run's loss up within a few steps
    monkeypatch.setenv("MINI_GLUE_THREADS", "1")
    monkeypatch.setattr(mini_glue, "LR_GRID", {"ivon": (0.5,), "adalora": (1e-3,), "lora": (1e-3,)})
    monkeypatch.setattr(mini_glue, "TUNE_TASKS", ("sst2",))
    args = ["--tasks", "sst2", "--seeds", "0", "--glue-dir", str(glue_dir), "--workers", "1",
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
            "--set", f"model={tiny_deberta}", *TINY, "lr=1e6"]
    assert mini_glue.main(args) == 0
    out = capsys.readouterr().out
    assert out.count(": training diverged at step ") == 3 + len(mini_glue.CELLS)
    marker = json.loads((tmp_path / "work" / "sst2" / "bayes-adalora-seed0" / mini_glue.DIVERGED).read_text())
    assert marker["error"].startswith("training diverged at step ") and "lower --lr" in marker["error"]

    table = json.loads((tmp_path / "out" / "mini-glue.json").read_text())
    assert table["tuning"] == {"ivon": {"0.5": None}, "adalora": {"0.001": None}, "lora": {"0.001": None}}
    assert table["learning_rates"] == mini_glue.FALLBACK_LR  # no lr of the sweep survived
    cell = table["results"]["sst2"]["adalora"]
    assert (cell["scores"], cell["diverged"], cell["mean"], cell["metric"]) == ([], 1, None, "accuracy")
    md = (tmp_path / "out" / "mini-glue.md").read_text()
    assert "| adalora | diverged (n=0, 1 diverged) |" in md
    assert "at or above adalora on 0 of 1 tasks." in md

    assert mini_glue.main(args) == 0  # diverged cells count as done: nothing is retried
    assert f"{len(mini_glue.CELLS)} cells done, 0 to run" in capsys.readouterr().out


def test_speed_interleaves_methods_and_measures_each_ones_memory_alone(tmp_path, monkeypatch):
    from conftest import SHARED_GLUE

    if not (SHARED_GLUE / "SST-2").is_dir():
        pytest.skip("GLUE files not beside the checkout")
    import speed

    monkeypatch.setattr(speed, "GLUE", SHARED_GLUE)
    monkeypatch.setenv("GLUE_DIR", str(SHARED_GLUE))  # the fresh memory processes read it too
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["--setting", "cpu", "--methods", "bayes-adalora", "lora", "--steps", "2", "--warmup", "1",
            "--memory-steps", "2", "--threads", "1", "--out", str(tmp_path)]
    assert speed.main(args) == 0
    # never speed-cpu.json
    result = json.loads((tmp_path / "speed-cpu-peft-adalora-bayes-adalora-lora.json").read_text())
    rows = result["methods"]
    assert list(rows) == ["peft-adalora", "bayes-adalora", "lora"]
    assert rows["peft-adalora"]["ratio_to_peft_adalora"] == 1.0
    assert result["memory_steps"] == 2 and result["machine"].endswith("1 threads")
    assert set(result["load_average_1min"]) == {"before", "after_timing"}
    for row in rows.values():
        assert 0 < row["forward_backward_s"] < row["step_s"] and row["optimizer_s"] > 0
        # MiniLM's fp32 weights alone are about 90 MB; training adds activations and optimizer state
        assert row["peak_rss_mb"] > 300 and 0 < row["training_adds_rss_mb"] < row["peak_rss_mb"]
    assert rows["lora"]["ratio_to_lora"] == 1.0 and rows["bayes-adalora"]["ratio_to_lora"] > 0
