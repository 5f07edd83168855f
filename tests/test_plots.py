"""The run's figures and correlation trajectory: names parsed by hand-worked cases, PNGs written by
training and by `bayes-adalora plot`, tick labels that do not overlap, and logging that leaves
training untouched."""

from __future__ import annotations

import json
import struct
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import helpers
from bayes_adalora.cli import main
from bayes_adalora.plots import PLOTS, moving_average, rank_grid, sigma_groups, split_layer_module
from bayes_adalora.run_folder import read_run

ALL_PNGS = ["correlations.png", "ranks.png", "sigma.png", "training.png"]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG signature and IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# ----------------------------------------------------------------------------- hand-worked cases


@pytest.mark.parametrize("name, expected", [
    ("bert.encoder.layer.3.attention.self.query", (3, "attention.self.query")),
    ("deberta.encoder.layer.11.output.dense", (11, "output.dense")),
    ("model.layers.2.self_attn.q_proj", (2, "self_attn.q_proj")),
    ("transformer.h.0.attn.c_attn", (0, "attn.c_attn")),
    ("bert.pooler.dense", (None, "pooler.dense")),
    ("classifier", (None, "classifier")),
])
def test_layer_and_module_of_a_name(name, expected):
    assert split_layer_module(name) == expected


def test_rank_grid_places_every_matrix():
    ranks = {
        "bert.encoder.layer.0.attention.self.query": 3, "bert.encoder.layer.0.output.dense": 1,
        "bert.encoder.layer.1.attention.self.query": 6, "bert.pooler.dense": 2,
    }
    grid, layers, modules, outside = rank_grid(ranks)
    assert layers == ["layer 0", "layer 1"] and modules == ["attention.self.query", "output.dense"]
    np.testing.assert_array_equal(grid, [[3, 1], [6, np.nan]])  # layer 1 has no output.dense here
    assert outside == {"pooler.dense": 2}


def test_long_module_names_wrap_at_dots():
    from bayes_adalora.plots import wrapped

    assert wrapped("attention.output.dense") == "attention.\noutput.dense"
    assert wrapped("attention.self.query_proj") == "attention.self.\nquery_proj"
    assert wrapped("output.dense") == "output.dense" and wrapped("classifier") == "classifier"


def test_moving_average_by_hand():
    np.testing.assert_allclose(moving_average([1, 2, 3, 4, 5], 2), [1, 1.5, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(moving_average([4, 2, 6], 5), [4, 3, 4])


def test_sigma_groups_pool_layers_by_module_and_factor():
    sigma = {
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default": torch.full((2, 3), 0.125),
        "base_model.model.bert.encoder.layer.1.attention.self.query.lora_A.default": torch.full((2, 3), 0.25),
        "base_model.model.bert.encoder.layer.1.attention.self.query.lora_E.default": torch.full((2, 1), 0.375),
        "base_model.model.bert.pooler.dense.lora_B.default": torch.full((4, 2), 0.5),
        "base_model.model.classifier.modules_to_save.default.weight": torch.full((2, 4), 0.625),
    }
    groups = sigma_groups(sigma)
    assert set(groups) == {"attention.self.query", "pooler.dense", "classifier"}
    assert sorted(groups["attention.self.query"]["Q"].tolist()) == [0.125] * 6 + [0.25] * 6  # exact in binary
    assert groups["attention.self.query"]["λ"].tolist() == [0.375, 0.375]
    assert set(groups["pooler.dense"]) == {"P"} and set(groups["classifier"]) == {"head"}


# ----------------------------------------------------------------------------- readable figures


def minilm_like_run(folder: Path) -> Path:
    """A run folder with MiniLM's 37 adapted matrices and a history, posterior and correlation log of a 300-step run."""
    folder.mkdir()
    modules = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
               "intermediate.dense", "output.dense"]
    names = [f"bert.encoder.layer.{i}.{m}" for i in range(6) for m in modules] + ["bert.pooler.dense"]
    rng = np.random.default_rng(0)
    ranks = {n: int(rng.integers(0, 7)) for n in names}
    results = {"task": "sst2", "method": "bayes-adalora", "final_ranks": ranks, "total_rank": sum(ranks.values()),
               "main_metric": "accuracy", "metrics": {"final": {}, "best": {}}}
    steps = 300
    config = {"task": "sst2", "method": "bayes-adalora", "init_r": 6, "model": "x", "total_steps": steps}
    history = {"loss": list(0.7 * np.exp(-np.arange(steps) / 100) + 0.05 * rng.random(steps)),
               "lr": [1.0] * steps, "budget": [int(222 - 74 * min(1, s / 200)) for s in range(steps)],
               "eval": [{"step": s, "accuracy": 0.5 + s / 1000} for s in range(30, 301, 30)]}
    block = {"snr_abs": 0.5, "snr": 0.7, "mean_abs": 0.7, "inv_sigma": -0.1, "e_abs": 0.6}
    correlations = {
        "sensitivity": "instantaneous |mu * grad|",
        "triplets": 222,
        "steps": [
            {"step": s, "budget": 200, "sensitivity": block, "snr": {"mean_abs": 1.0, "inv_sigma": 0.02}}
            for s in range(30, 211, 3)
        ],
    }
    sigma = {f"base_model.model.{n}.{f}.default": torch.rand(6, 8) * 10 ** rng.uniform(-3, -1)
             for n in names for f in ("lora_A", "lora_B", "lora_E")}
    sigma["base_model.model.classifier.modules_to_save.default.weight"] = torch.rand(2, 384) * 0.05
    save_file({f"{k}.sigma": v.contiguous() for k, v in sigma.items()}, folder / "posterior.safetensors")
    for name, content in (("results.json", results), ("config.json", config), ("history.json", history),
                          ("correlations.json", correlations)):
        (folder / name).write_text(json.dumps(content))
    return folder


def overlapping_labels(figure) -> list[tuple[str, str]]:
    """Pairs of visible tick labels (and axis labels) of one axes whose drawn boxes intersect."""
    renderer = figure.canvas.get_renderer()
    clashes = []
    for ax in figure.axes:
        for axis in (ax.xaxis, ax.yaxis):
            texts = [t for t in axis.get_ticklabels() if t.get_visible() and t.get_text()] + [axis.label]
            boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_text()]
            clashes += [(a, b) for (a, box_a), (b, box_b) in combinations(boxes, 2) if box_a.overlaps(box_b)]
    return clashes


@pytest.mark.parametrize("name", list(PLOTS))
def test_figures_of_a_minilm_sized_run_have_titles_and_no_overlapping_labels(name, tmp_path):
    run = read_run(minilm_like_run(tmp_path / "run"))
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = PLOTS[name](run)
    FigureCanvasAgg(figure).draw()  # lay out and draw as savefig does
    assert overlapping_labels(figure) == []
    assert figure.get_suptitle() or all(ax.get_title() for ax in figure.axes)
    for ax in figure.axes:  # every axes says what it shows
        assert ax.get_title() or ax.get_xlabel() or ax.get_ylabel(), name


# ----------------------------------------------------------------------------- written by training and by `plot`


def train_argv(glue_dir: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return helpers.train_argv(glue_dir, model, out, *extra, plots=True, max_steps=12, max_length=32)


@pytest.fixture(scope="module")
def bayes_run(tmp_path_factory, glue_dir, tiny_deberta) -> Path:
    out = tmp_path_factory.mktemp("plots") / "bayes"
    assert main(train_argv(glue_dir, tiny_deberta, out)) == 0  # plots and correlations on by default
    return out


def test_training_writes_every_figure_and_the_correlation_trajectory(bayes_run):
    assert sorted(p.name for p in bayes_run.glob("*.png")) == ALL_PNGS
    for png in bayes_run.glob("*.png"):
        width, height = png_size(png)
        assert 400 < width < 2500 and 300 < height < 2500, png
    log = json.loads((bayes_run / "correlations.json").read_text())
    config = json.loads((bayes_run / "config.json").read_text())
    tinit, tfinal, delta_t, total = config["tinit"], config["tfinal"], config["delta_t"], config["total_steps"]
    # AdaLoRA masks at multiples of deltaT inside (tinit, total - tfinal), and once more at total - tfinal
    masks = [s for s in range(tinit + 1, total - tfinal) if s % delta_t == 0] + [total - tfinal]
    assert [e["step"] for e in log["steps"]] == masks
    assert log["triplets"] == config["init_r"] * len(
        json.loads((bayes_run / "results.json").read_text())["final_ranks"]
    )
    for entry in log["steps"]:
        assert set(entry["sensitivity"]) == {"snr_abs", "snr", "mean_abs", "inv_sigma", "e_abs"}
        assert set(entry["snr"]) == {"mean_abs", "inv_sigma"}
        # (the values themselves are checked against an independent computation in test_evaluation.py)
    assert "correlations" not in json.loads((bayes_run / "history.json").read_text())


def test_plot_command_writes_into_another_folder(bayes_run, tmp_path, capfd):
    capfd.readouterr()
    assert main(["plot", str(bayes_run), "--output-dir", str(tmp_path / "figs")]) == 0
    printed = capfd.readouterr().out.split()
    assert sorted(Path(p).name for p in printed) == ALL_PNGS
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ALL_PNGS


def test_correlation_logging_leaves_training_untouched(bayes_run, tmp_path, glue_dir, tiny_deberta):
    plain = tmp_path / "plain"
    assert main(train_argv(glue_dir, tiny_deberta, plain, "--no-log-correlations", "--no-plots")) == 0
    a, b = (json.loads((run / "results.json").read_text()) for run in (bayes_run, plain))
    assert a["metrics"] == b["metrics"] and a["final_ranks"] == b["final_ranks"]
    assert (bayes_run / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (plain / "adapter" / "adapter_model.safetensors").read_bytes()
    assert not (plain / "correlations.json").exists() and not list(plain.glob("*.png"))


def test_adamw_runs_get_the_figures_they_can_have(tmp_path, glue_dir, tiny_deberta, capfd):
    adalora = tmp_path / "adalora"
    assert main(train_argv(glue_dir, tiny_deberta, adalora, "--method", "adalora")) == 0
    assert sorted(p.name for p in adalora.glob("*.png")) == ["ranks.png", "training.png"]
    assert not (adalora / "correlations.json").exists()
    capfd.readouterr()
    assert main(train_argv(glue_dir, tiny_deberta, tmp_path / "x", "--method", "adalora", "--log-correlations")) == 2
    assert "--log-correlations" in capfd.readouterr().err


def test_plot_refuses_a_folder_that_is_not_a_run(tmp_path, capfd):
    capfd.readouterr()
    assert main(["plot", str(tmp_path)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0]
