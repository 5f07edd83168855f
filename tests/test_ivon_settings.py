"""IVON's settings that follow the run (`ivon_settings.py`) and the sigma spread a run records."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft.tuners.adalora.layer import RankAllocator

from bayes_adalora.cli import main
from bayes_adalora.config import TrainConfig
from bayes_adalora.errors import UserError
from bayes_adalora.ivon_settings import auto_beta2, auto_ess, data_share, resolve_beta2, resolve_ess
from bayes_adalora.schedules import masking_steps
from bayes_adalora.trackers import sigma_statistics


@pytest.mark.parametrize(("steps", "beta2"), [(300, 29 / 30), (1000, 0.99), (50_000, 0.9998), (100, 0.9), (7, 0.9)])
def test_auto_beta2_spans_a_tenth_of_the_run(steps, beta2):
    assert auto_beta2(steps) == pytest.approx(beta2, abs=1e-15)
    assert resolve_beta2("auto", steps) == auto_beta2(steps)
    assert resolve_beta2(0.99999, steps) == 0.99999


def test_auto_ess_is_ten_per_trainable_parameter_or_the_examples_by_hand():
    # MRPC's held-out split: 3,302 rows and a 254,432-parameter adapter -> 2,544,320 (the screen's 2.5e6)
    assert auto_ess(3302, 254_432) == 2_544_320.0
    assert auto_ess(67_349, 5_000) == 67_349.0  # more examples than 10 per parameter: the examples
    assert resolve_ess("auto", 100, 11) == 110.0 and resolve_ess("train-size", 100, 11) == 100.0
    assert resolve_ess(None, 100, None) == 100.0 and resolve_ess(2.5e6, 100, None) == 2.5e6
    with pytest.raises(ValueError, match="trainable_parameters"):
        resolve_ess("auto", 100, None)
    with pytest.raises(UserError, match=r"^--ivon-ess must be a number, auto or train-size, got 'often'$"):
        TrainConfig(ivon_ess="often")


def test_v2s_settings_spelled_as_flags_are_ivon_opts_defaults_with_the_training_set_size():
    """The settings before `auto` (v2's, and the paper's) stay one flag each away and build, number for number,
    the IVON that ivon-opt's own defaults build with ess = the training-set size (and the paper's weight decay
    and clip radius, which were v2's defaults too)."""
    import ivon

    from bayes_adalora.build import make_optimizer
    from bayes_adalora.config import make_config, plan_run

    flags = {"ivon_ess": "train-size", "ivon_beta2": 0.99999, "ivon_hess_init": 1.0, "ivon_weight_decay": 1e-8,
             "ivon_beta1": 0.9, "ivon_clip_radius": 1e-3, "max_steps": 300}
    config, _ = make_config(flags)
    plan = plan_run(config, "m", train_examples=3668, batches_per_epoch=115, trainable_parameters=254_432)
    model = torch.nn.Linear(3, 2)
    ours = make_optimizer(model, config, plan.ivon_ess_resolved, total_steps=plan.total_steps).param_groups[0]
    stock = ivon.IVON(model.parameters(), lr=config.resolved_lr(), ess=3668.0, weight_decay=1e-8,
                      clip_radius=1e-3).param_groups[0]
    assert set(ours) == set(stock)
    for key in stock:
        if key != "params":
            assert torch.equal(ours[key], stock[key]) if torch.is_tensor(stock[key]) else ours[key] == stock[key], key


def test_data_share_of_the_hessian_average_by_hand():
    assert data_share(0.5, 3) == pytest.approx(7 / 8)
    assert data_share(0.99999, 300) == pytest.approx(1 - 0.99999**300)  # v2: 0.3%
    assert data_share(0.99999, 300) < 0.003
    # auto: 1 - (1 - 10/T)^(0.15 T) -> 1 - e^-1.5 at the first masking step of a long run
    assert data_share(auto_beta2(30_000), 4_500) == pytest.approx(1 - math.exp(-1.5), abs=1e-3)


def peft_masking_steps(total: int, tinit: int, tfinal: int, delta_t: int) -> list[int]:
    """The steps at which peft's own schedule masks by score while the budget falls."""
    allocator = object.__new__(RankAllocator)
    allocator.peft_config = SimpleNamespace(tinit=tinit, tfinal=tfinal, total_step=total, deltaT=delta_t)
    allocator.init_bgt, allocator.target_bgt = 60, 40
    return [s for s in range(1, total + 1) if s <= total - tfinal and allocator.budget_schedule(s)[1]]


@pytest.mark.parametrize(("total", "tinit", "tfinal", "delta_t"),
                         [(300, 45, 135, 1), (2000, 300, 900, 4), (100, 10, 30, 7), (50, 0, 0, 5), (20, 9, 9, 5)])
def test_masking_steps_are_peft_s_first_and_last(total, tinit, tfinal, delta_t):
    steps = peft_masking_steps(total, tinit, tfinal, delta_t)
    assert masking_steps(total, tinit, tfinal, delta_t) == ((steps[0], steps[-1]) if steps else None)


def test_beta2_auto_is_checked_like_a_number():
    assert TrainConfig(ivon_beta2="auto").ivon_beta2 == "auto"
    with pytest.raises(UserError, match="--ivon-beta2 must be a number or auto, got 'often'"):
        TrainConfig(ivon_beta2="often")
    with pytest.raises(UserError, match=r"--ivon-beta2 must lie in \[0, 1\)"):
        TrainConfig(ivon_beta2=1.0)


def test_a_run_with_beta2_auto_trains_with_it_and_records_sigma_at_its_masking_steps(glue_dir, tiny_deberta, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--task", "sst2", "--data-dir", str(glue_dir), "--model", str(tiny_deberta), "--output-dir",
            str(out), "--max-steps", "20", "--max-length", "16", "--no-progress", "--no-plots", "--ivon-beta2", "auto",
            "--ivon-ess", "train-size", "--tinit", "4", "--tfinal", "6", "--delta-t", "3"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["ivon_beta2"] == "auto" and config["ivon_beta2_resolved"] == 0.9  # 1 - 10/20 is below the floor
    history = json.loads((out / "history.json").read_text())
    assert [entry["step"] for entry in history["sigma"]] == [6, 12]  # delta_t 3 after tinit 4, up to 20 - 6
    # the data's share of IVON's Hessian average there: 1 - 0.9^6 and 1 - 0.9^12
    assert [entry["hessian_data_share"] for entry in history["sigma"]] == pytest.approx([1 - 0.9**6, 1 - 0.9**12])
    for entry in history["sigma"]:
        for factor in ("P", "lambda", "Q", "all"):
            assert entry[f"sigma/{factor}/p01"] <= entry[f"sigma/{factor}/median"] <= entry[f"sigma/{factor}/p99"]
    # the Hessian moved: at beta2 0.9 and 12 steps, under 30% of hess_init (1.0) is left, so sigma rose
    # from 1/sqrt(ess) (64 examples) in some entries
    assert history["sigma"][-1]["sigma/all/p99"] > 1.2 / math.sqrt(64)


def test_overall_sigma_statistics_pool_every_factor():
    sigma = {"base_model.model.layer.0.query.lora_A.default": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
             "base_model.model.layer.0.query.lora_E.default": torch.tensor([[10.0], [20.0]]),
             "base_model.model.layer.0.query.lora_B.default": torch.tensor([[5.0, 6.0]])}
    stats = sigma_statistics(sigma, overall=True)
    pooled = [1, 2, 3, 4, 10, 20, 5, 6]
    assert stats["sigma/all/p99"] == pytest.approx(np.percentile(pooled, 99))
    assert stats["sigma/all/median"] == 4.5 and stats["sigma/lambda/median"] == 15.0
    assert "sigma/all/p01" not in sigma_statistics(sigma)
