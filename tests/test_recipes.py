"""`--recipe paper`: the values of shared/recipes/paper-glue.md, typed here from that file, and explicit flags win."""

from __future__ import annotations

import pytest

from bayes_adalora.cli import build_parser, main
from bayes_adalora.config import TrainConfig, make_config
from bayes_adalora.errors import UserError


def paper(task: str, method: str, **given) -> TrainConfig:
    config, _ = make_config({"task": task, "recipe": "paper", "method": method, **given})
    return config


def from_command_line(*flags: str) -> TrainConfig:
    args = vars(build_parser().parse_args(["train", *flags]))
    args.pop("command")
    config, _ = make_config(args)
    return config


def test_cola_bayes_adalora_follows_the_paper():
    c = paper("cola", "bayes-adalora")
    # CoLA row: max_len 64, 25 epochs, IVON two-phase 2.0 to 0.4 (const until step 500), warm-up 100,
    # alpha 32, orth_reg 0.1, tinit 800, tfinal 3500, deltaT 10
    assert c.max_length == 64
    assert c.num_train_epochs == 25
    assert c.lr_scheduler_type == "two-phase"
    assert c.learning_rate == 1.0  # "base lr 1.0 scaled by a multiplier"
    assert (c.two_phase_first, c.two_phase_second, c.two_phase_const) == (2.0, 0.4, 500)
    assert c.warmup_steps == 100
    assert c.lora_alpha == 32
    assert c.orth_reg == 0.1
    assert (c.tinit, c.tfinal, c.delta_t) == (800, 3500, 10)
    # shared settings: rank-2 budget, batch 32, IVON hyperparameters
    assert (c.init_r, c.target_r) == (3, 2)
    assert c.batch_size == 32
    assert (c.ivon_hess_init, c.ivon_beta1, c.ivon_beta2) == (1.0, 0.9, 0.99999)
    assert c.ivon_weight_decay == 1e-8
    assert c.ivon_clip_radius == 1e-3
    assert c.train_mc_samples == 1
    assert (c.sensitivity_beta1, c.sensitivity_beta2) == (0.85, 0.85)
    assert c.criterion == "snr_abs"  # "Posterior criterion default: SNR of |theta|"


def test_cola_adalora_uses_the_adamw_column():
    c = paper("cola", "adalora")
    assert c.learning_rate == 8e-4
    assert c.warmup_steps == 100
    assert c.lr_scheduler_type == "linear"
    assert c.weight_decay == 0.0  # "weight decay 0 for AdamW"
    assert (c.init_r, c.target_r, c.max_length, c.num_train_epochs) == (3, 2, 64, 25)


def test_other_rows_of_the_table():
    sst2 = paper("sst2", "bayes-adalora")
    assert (sst2.learning_rate, sst2.lr_scheduler_type, sst2.warmup_steps) == (0.4, "linear", 500)
    assert (sst2.max_length, sst2.num_train_epochs, sst2.lora_alpha) == (128, 24, 16)
    assert (sst2.tinit, sst2.tfinal, sst2.delta_t) == (6000, 22000, 100)
    assert paper("sst2", "adalora").warmup_steps == 1000
    full_sst2 = paper("sst2", "full")
    assert (full_sst2.learning_rate, full_sst2.num_train_epochs) == (2e-5, 6)
    assert paper("qnli", "full").num_train_epochs == 4
    assert paper("mnli", "full").learning_rate == 1.5e-5
    lora = paper("mrpc", "lora")
    assert (lora.learning_rate, lora.lora_r) == (2e-4, 2)
    rte = paper("rte", "adalora-ivon")
    assert (rte.lr_scheduler_type, rte.two_phase_first, rte.two_phase_second, rte.two_phase_const) == (
        "two-phase",
        2.0,
        0.5,
        400,
    )
    assert (rte.orth_reg, rte.delta_t, rte.max_length, rte.num_train_epochs) == (0.3, 1, 320, 50)
    assert paper("rte", "adalora").learning_rate == 1.2e-3
    stsb = paper("stsb", "adalora")
    assert (stsb.learning_rate, stsb.orth_reg, stsb.tfinal) == (2.2e-3, 0.3, 2000)
    assert paper("qqp", "bayes-adalora").warmup_steps == 500
    assert paper("qqp", "adalora").warmup_steps == 2000


def test_explicit_values_win_over_the_recipe():
    assert paper("cola", "bayes-adalora", learning_rate=0.1).learning_rate == 0.1
    c = from_command_line("--task", "cola", "--recipe", "paper", "--learning-rate", "0.1")
    assert c.learning_rate == 0.1
    assert c.max_length == 64 and c.tinit == 800  # the rest still comes from the recipe
    # a flag equal to the built-in default still wins: 128 is TrainConfig's default and the recipe says 64
    assert from_command_line("--task", "cola", "--recipe", "paper", "--max-length", "128").max_length == 128
    assert from_command_line("--task", "cola", "--recipe", "paper", "--init-r", "6", "--target-r", "4").target_r == 4


def test_without_the_recipe_nothing_of_it_applies():
    c = from_command_line("--task", "cola")
    assert c.recipe is None and c.tinit is None and c.learning_rate is None and c.max_length == TrainConfig().max_length


def test_recipe_for_wnli_is_a_clear_user_error(tmp_path, capsys):
    with pytest.raises(UserError, match="wnli"):
        make_config({"task": "wnli", "recipe": "paper"})
    out = tmp_path / "out"
    assert main(["train", "--task", "wnli", "--recipe", "paper", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wnli" in err[0] and "Traceback" not in err[0]
    assert not out.exists()


def test_recipe_then_an_inconsistent_flag_is_still_checked():
    # the recipe's init_r is 3: asking for target_r 4 on top of it is refused
    with pytest.raises(UserError, match="--target-r 4"):
        paper("cola", "bayes-adalora", target_r=4)
