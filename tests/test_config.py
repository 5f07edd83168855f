"""The config checks itself on creation, the run plan resolves once, config.json reruns it, and a
checkpoint's run state round-trips: fast unit tests, no training run."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest

from bayes_adalora.checkpoint import check_same_settings, checkpoint_settings, read_run_state, write_run_state
from bayes_adalora.config import (
    TrainConfig,
    bounds_of,
    config_fields,
    field_type,
    make_config,
    plan_run,
    planned_config,
)
from bayes_adalora.errors import UserError
from bayes_adalora.methods import METHODS


@pytest.mark.parametrize("given, words", [
    (dict(divergence_factor=0.5), "--divergence-factor must be 0 (off) or at least 1, got 0.5"),
    (dict(mc_samples=-1), "--mc-samples must be 0 (off) or positive, got -1"),
    (dict(learning_rate=-1), "--learning-rate must lie in (0, 1e+06], got -1"),
])
def test_the_python_api_cannot_skip_a_check(given, words):
    with pytest.raises(UserError) as refused:
        TrainConfig(**given)
    assert str(refused.value).startswith(words) and "\n" not in str(refused.value)


def test_a_bad_config_fails_in_one_sentence_from_python():
    code = "from bayes_adalora import TrainConfig; TrainConfig(divergence_factor=0.5)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "bayes_adalora.errors.UserError: --divergence-factor must be 0 (off) or at least 1, got 0.5: "
        "a smaller factor stops any run at its first step")


NUMERIC = [f for f in config_fields() if bounds_of(f) is not None]


def outside(f) -> list:
    """Values the field must refuse: NaN, inf, and 0 and -1 where its bounds exclude them."""
    return [math.nan, math.inf] + [v for v in (0, -1) if not bounds_of(f).contains(v)]


@pytest.mark.parametrize("f", NUMERIC, ids=lambda f: f.name)
def test_every_number_outside_its_bounds_is_refused_naming_the_flag(f):
    for value in outside(f):
        with pytest.raises(UserError, match=f"^--{f.name.replace('_', '-')} must "):
            TrainConfig(**{f.name: value})
    if field_type(f) is int:
        with pytest.raises(UserError, match="whole number"):
            TrainConfig(**{f.name: 2.5})


def test_values_from_a_json_file_are_checked_for_their_type_in_one_sentence():
    """A --config file or the Python API can give any JSON value; each field takes only its own type."""
    config = TrainConfig(seed=1.0, batch_size=32.0, target_modules=("query", "value"))
    assert (type(config.seed), type(config.batch_size), config.target_modules) == (int, int, ["query", "value"])
    refused = {
        "plots": ("no", "--plots must be true or false, got 'no'"),
        "task": (5, "--task must be a string, got 5"),
        "text_columns": ("sentence", """--text-columns must be a list of names, got the string 'sentence' """
                                     """(write ["sentence"] for one name)"""),
        "target_modules": (["query", 1], "--target-modules must be a list of names, got ['query', 1]"),
    }
    for name, (value, message) in refused.items():
        with pytest.raises(UserError) as err:
            TrainConfig(**{name: value})
        assert str(err.value) == message
    kinds = {field_type(f) for f in config_fields()}
    assert kinds == {str, int, float, bool, list[str]}  # a new kind of field needs its check here


def test_every_number_field_has_bounds():
    numbers = [f.name for f in config_fields() if field_type(f) in (int, float)]
    assert numbers == [f.name for f in NUMERIC]


def test_the_registry_decides_every_method_property():
    assert {n: (m.uses_ivon, m.uses_adalora, m.reads_posterior) for n, m in METHODS.items()} == {
        "bayes-adalora": (True, True, True), "adalora-ivon": (True, True, False), "adalora": (False, True, False),
        "lora": (False, False, False), "full": (False, False, False)}
    assert TrainConfig(method="adalora").resolved_lr() == 2e-3
    # IVON's default keeps its first step (lr x hess_init) whatever the initial Hessian; a given lr is kept
    for hess_init in (1.0, 0.1, 0.01):
        assert TrainConfig(ivon_hess_init=hess_init).resolved_lr() * hess_init == pytest.approx(3.0, rel=1e-15)
    assert TrainConfig(ivon_hess_init=0.1, learning_rate=4.0).resolved_lr() == 4.0
    assert TrainConfig(method="adalora", ivon_hess_init=0.1).resolved_lr() == 2e-3  # AdamW ignores IVON's setting


TRAINABLE = 20_000  # an adapter's trainable parameters, for the plans of IVON runs (--ivon-ess auto)


def test_the_plan_resolves_every_default_once():
    plan = plan_run(TrainConfig(num_train_epochs=2.0), "m", train_examples=1000, batches_per_epoch=32,
                    trainable_parameters=500)
    # 64 steps: 6% warm-up is 3 steps, ten evaluations, ess 10 per trainable parameter (above the 1000 examples)
    assert (plan.total_steps, plan.warmup_steps, plan.eval_steps, plan.ivon_ess_resolved, plan.learning_rate) == (
        64, 3, 6, 5000.0, 30.0)  # IVON's lr: 3 / the initial Hessian, 0.1
    two_epochs = TrainConfig(num_train_epochs=2.0)
    assert plan_run(two_epochs, "m", 1000, 32, trainable_parameters=99).ivon_ess_resolved == 1000.0
    paper = plan_run(TrainConfig(num_train_epochs=2.0, ivon_ess="train-size"), "m", 1000, 32, trainable_parameters=500)
    assert paper.ivon_ess_resolved == 1000.0
    assert plan_run(TrainConfig(ivon_ess=77.0), "m", 1000, 32).ivon_ess_resolved == 77  # a number needs no size
    with pytest.raises(ValueError, match="give the plan trainable_parameters"):
        plan_run(TrainConfig(), "m", 1000, 32)
    assert 0 <= plan.tinit < plan.total_steps - plan.tfinal and plan.delta_t >= 1
    lora = plan_run(TrainConfig(method="lora", max_steps=10, warmup_steps=0), "m", 1000, 32)
    assert (lora.total_steps, lora.warmup_steps, lora.ivon_ess_resolved, lora.tinit, lora.learning_rate) == (
        10, 0, None, None, 1e-3)
    with pytest.raises(UserError, match="--tinit 6 and --tfinal 6 leave no steps"):
        plan_run(TrainConfig(max_steps=12, tinit=6, tfinal=6), "m", 1000, 32)


def test_config_json_reruns_the_same_plan_and_explicit_values_win():
    config, _ = make_config({"method": "adalora", "num_train_epochs": 1.5, "seed": 3})
    plan = plan_run(config, "some/model", train_examples=500, batches_per_epoch=16)
    saved = planned_config(config, plan)
    again, explicit = make_config({}, base=saved)
    assert explicit == set() and plan_run(again, "some/model", 500, 16) == plan
    # what was derived is derived again: on other data, as a fresh run with the same flags
    assert saved["derived"] == ["model", "data_dir", "learning_rate", "warmup_steps", "eval_steps", "tinit", "tfinal",
                                "delta_t"]
    other = plan_run(again, "some/model", train_examples=999, batches_per_epoch=99)
    assert other == plan_run(config, "some/model", 999, 99) and other.tinit != plan.tinit
    changed, explicit = make_config({"seed": 4}, base=saved)
    assert changed.seed == 4 and changed.method == "adalora" and explicit == {"seed"}
    # another method takes its own default lr, another length its own phases
    ivon, _ = make_config({"method": "bayes-adalora"}, base=saved)
    assert ivon.resolved_lr() == TrainConfig(method="bayes-adalora").resolved_lr()
    longer, _ = make_config({"max_steps": 3000}, base=saved)
    assert plan_run(longer, "m", 500, 16).tinit == plan_run(TrainConfig(method="adalora", max_steps=3000), "m", 500,
                                                              16).tinit
    # a setting that was given stays given
    given = dataclasses.replace(config, tinit=5)
    fixed, _ = make_config({"max_steps": 3000}, base=planned_config(given, plan_run(given, "m", 500, 16)))
    assert fixed.tinit == 5


def test_a_config_json_of_a_run_before_ivon_ess_auto_reruns_with_the_training_set_size():
    config, _ = make_config({"ivon_beta2": 0.99999, "ivon_hess_init": 1.0, "ivon_ess": "train-size"})
    saved = planned_config(config, plan_run(config, "m", 3668, 115, trainable_parameters=TRAINABLE))
    old = {k: v for k, v in saved.items() if k != "ivon_ess_resolved"}  # a v2 run's file: ess derived, a number
    old.update(ivon_ess=3668.0, derived=[*saved["derived"], "ivon_ess"])
    again, _ = make_config({}, base=old)
    assert (again.ivon_ess, again.ivon_beta2, again.ivon_hess_init) == ("train-size", 0.99999, 1.0)
    assert plan_run(again, "m", 3668, 115).ivon_ess_resolved == 3668.0  # as the run had it
    fresh, _ = make_config({}, base=saved)  # a file of this version keeps its setting
    assert fresh.ivon_ess == "train-size" and make_config({}, base={"ivon_ess": "auto"})[0].ivon_ess == "auto"


def test_a_config_file_read_by_the_cli_re_derives_what_its_run_derived(tmp_path):
    from bayes_adalora.cli import read_config_file

    config, _ = make_config({"method": "adalora", "max_steps": 300})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(planned_config(config, plan_run(config, "m", 1000, 32))))
    longer, _ = make_config({"max_steps": 3000}, base=read_config_file(str(path)))
    assert plan_run(longer, "m", 1000, 32) == plan_run(TrainConfig(method="adalora", max_steps=3000), "m", 1000, 32)


def test_what_the_paper_recipe_filled_in_it_fills_in_again_for_another_method():
    config, _ = make_config({"task": "mrpc", "method": "bayes-adalora", "recipe": "paper", "seed": 3})
    saved = planned_config(config, plan_run(config, "m", 3668, 115, trainable_parameters=TRAINABLE))
    adamw, _ = make_config({"method": "adalora"}, base=saved)
    fresh, _ = make_config({"task": "mrpc", "method": "adalora", "recipe": "paper", "seed": 3})
    assert adamw == fresh and adamw.learning_rate != config.learning_rate


def test_flags_beside_a_config_file_win_for_epochs_and_the_paper_recipe():
    """--num-train-epochs over a file that counted steps trained the file's steps; --recipe paper over a plain run's
    file kept the file's ranks, alpha and epochs under the recipe's lr (a mix of the two)."""
    config = TrainConfig(task="sst2", max_steps=300)
    saved = planned_config(config, plan_run(config, "m", 67349, 2105, trainable_parameters=TRAINABLE))
    assert make_config({"num_train_epochs": 5}, base=saved)[0].max_steps is None
    assert make_config({"num_train_epochs": 5, "max_steps": 40}, base=saved)[0].max_steps == 40
    plain = TrainConfig(task="sst2")
    plain = planned_config(plain, plan_run(plain, "m", 67349, 2105, trainable_parameters=TRAINABLE))
    recipe, _ = make_config({"recipe": "paper"}, base=plain)
    paper, _ = make_config({"task": "sst2", "recipe": "paper"})
    assert (recipe.init_r, recipe.target_r, recipe.lora_alpha, recipe.num_train_epochs, recipe.learning_rate) == (
        paper.init_r, paper.target_r, paper.lora_alpha, paper.num_train_epochs, paper.learning_rate) == (
        3, 2, 16, 24, 0.4)
    assert make_config({"recipe": "paper"}, base=saved)[0].max_steps is None  # the recipe's epochs, not 300 steps
    with pytest.raises(UserError, match=r"^--task must be a string, got 5$"):
        make_config({"task": 5, "recipe": "paper"})  # an AttributeError in the recipe before


def test_a_warm_up_longer_than_the_run_or_a_two_phase_step_outside_it_is_refused():
    with pytest.raises(UserError, match=r"^--warmup-steps 1000 is longer than the run's 300 steps"):
        plan_run(make_config({"method": "lora", "recipe": "paper", "max_steps": 300})[0], "m", 67349, 2105)
    for const, steps in ((500, 300), (50, 1000), (100, 1000)):  # no second phase; inside the warm-up; no hold
        config = TrainConfig(lr_scheduler_type="two-phase", two_phase_const=const, warmup_steps=100, max_steps=steps)
        with pytest.raises(UserError, match=rf"^--two-phase-const {const} must lie after the warm-up's end"):
            plan_run(config, "m", 67349, 2105, trainable_parameters=TRAINABLE)
    plan_run(TrainConfig(lr_scheduler_type="two-phase", two_phase_const=500, warmup_steps=100, max_steps=1500), "m",
             1, 1,
             trainable_parameters=TRAINABLE)


def test_ivon_arguments_take_whole_floats_as_the_config_does():
    from bayes_adalora.hf_trainer import IVONArguments

    assert type(IVONArguments(init_r=6.0, target_r=4.0).init_r) is int


def test_a_checkpoint_refuses_a_resume_with_other_settings_but_takes_a_new_lr(tmp_path):
    config, _ = make_config({"method": "adalora", "max_steps": 300})
    settings = planned_config(config, plan_run(config, "m", 1000, 32, trainable_parameters=TRAINABLE))
    write_run_state(tmp_path, {"step": 3, "history": {"loss": [float("nan")]}, "settings": settings})

    def resume(**given):
        again, _ = make_config({"method": "adalora", "max_steps": 300, **given})
        plan = plan_run(again, "m", 1000, 32, trainable_parameters=TRAINABLE)
        state = read_run_state(tmp_path)
        check_same_settings(tmp_path, state["settings"], planned_config(again, plan))
        return state

    with pytest.raises(UserError, match=r"other settings \(the step count 300 there, 3000 here\)"):
        resume(max_steps=3000)
    with pytest.raises(UserError, match=r"--method 'adalora' there, 'bayes-adalora' here"):
        resume(method="bayes-adalora")
    state = resume(learning_rate=1e-4, eval_steps=7, output_dir="elsewhere")
    assert state["step"] == 3 and math.isnan(state["history"]["loss"][0])  # NaN is kept as NaN
    assert checkpoint_settings(tmp_path) == settings  # what a resume without --learning-rate takes the lr from
    (tmp_path / "bayes-adalora-state.json").write_text('{"step": 3')  # cut short
    with pytest.raises(UserError, match=r"is damaged \(bayes-adalora-state.json cannot be read\)"):
        read_run_state(tmp_path)
    assert checkpoint_settings(tmp_path) is None
