"""Checkpoints and exact resume: a run killed with SIGKILL and resumed equals an uninterrupted one, bitwise."""

import json
import random
import sys

import pytest
import torch
from safetensors.torch import load_file

from bayes_adalora.cli import main
from helpers import complete_checkpoints, kill_at_checkpoint, train_argv

STEPS = 60


def run_args(glue_dir, model, out, *extra):
    return train_argv(glue_dir, model, out, *extra, max_steps=STEPS, max_length=32, batch_size=8, eval_steps=15)


def adapter_tensors(run):
    return load_file(run / "adapter" / "adapter_model.safetensors")


def assert_same_run(a, b):
    ra, rb = (json.loads((r / "results.json").read_text()) for r in (a, b))
    assert ra["metrics"] == rb["metrics"] and ra["final_ranks"] == rb["final_ranks"]
    ha, hb = (json.loads((r / "history.json").read_text()) for r in (a, b))
    assert ha["loss"] == hb["loss"] and ha["eval"] == hb["eval"]
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    if (a / "posterior.safetensors").exists():
        pa, pb = load_file(a / "posterior.safetensors"), load_file(b / "posterior.safetensors")
        assert all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("method", ["bayes-adalora", "adalora"])
def test_killed_and_resumed_runs_equal_the_uninterrupted_run(method, tmp_path, glue_dir, tiny_deberta):
    reference = tmp_path / "reference"
    assert main(run_args(glue_dir, tiny_deberta, reference, "--method", method)) == 0
    kills = sorted(random.Random(7).sample(range(5, STEPS - 5), 3)) if method == "bayes-adalora" else [33]
    for kill in kills:
        out = tmp_path / f"killed-{kill}"
        args = run_args(glue_dir, tiny_deberta, out, "--method", method, "--save-steps", "1")
        kill_at_checkpoint([sys.executable, "-m", "bayes_adalora.cli", *args], out, kill)
        latest = max(complete_checkpoints(out))
        # a kill while a checkpoint is written leaves it incomplete (without the run's state file); --resume
        # takes the latest complete one
        assert latest < STEPS and len(list((out / "checkpoints").glob("checkpoint-*"))) <= 3
        assert main([*args, "--resume-from-checkpoint"]) == 0
        assert len(list((out / "checkpoints").glob("checkpoint-*"))) <= 2  # keeps the last 2
        assert_same_run(reference, out)


def test_resume_refuses_a_missing_checkpoint(tmp_path, glue_dir, tiny_deberta, capsys):
    out = tmp_path / "nothing"
    code = main(run_args(glue_dir, tiny_deberta, out, "--resume-from-checkpoint", str(tmp_path / "no-such-checkpoint")))
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint" in err[0]


def test_divergence_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, glue_dir, tiny_deberta, capsys):
    out = tmp_path / "diverged"
    code = main(run_args(glue_dir, tiny_deberta, out, "--lr", "1e4", "--ivon-clip-radius", "1e6", "--save-steps", "1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "diverged at step" in err[0]
    step = int(err[0].split("diverged at step ")[1].split(":")[0])
    kept = complete_checkpoints(out)
    # the loss of step s is taken at the weights of step s - 1: the last good checkpoint is s - 2
    assert kept == [step - 2]
    assert f"checkpoint-{step - 2}" in err[0]
    state = json.loads((out / "checkpoints" / f"checkpoint-{kept[-1]}" / "bayes-adalora-state.json").read_text())
    assert state["step"] == step - 2
    weights = load_file(out / "checkpoints" / f"checkpoint-{kept[-1]}" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    # usable: the run goes on from it with a sane learning rate
    # (the bound on IVON's step is part of the run's settings, so it is given again)
    assert main(run_args(glue_dir, tiny_deberta, out, "--lr", "1.0", "--ivon-clip-radius", "1e6", "--resume")) == 0
    config = json.loads((out / "config.json").read_text())
    history = json.loads((out / "history.json").read_text())
    assert config["learning_rate"] == 1.0 and len(history["loss"]) == STEPS
    assert all(lr <= 1.0 for lr in history["lr"][step - 2:])


def test_exploding_loss_stops_the_run_before_it_turns_nan(tmp_path, glue_dir, tiny_deberta, capsys):
    """IVON clips its update, so lr 1e4 makes the loss explode without NaN; the run still stops."""
    out = tmp_path / "exploded"
    code = main(run_args(glue_dir, tiny_deberta, out, "--lr", "1e4", "--divergence-factor", "3", "--save-steps", "1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "times the first step's" in err[0], err
    assert not (out / "results.json").exists()


def test_resume_from_a_checkpoint_at_an_epoch_end(tmp_path, glue_dir, tiny_deberta):
    """64 examples in batches of 8: step 16 ends the second epoch; resuming there starts the third."""
    reference, saved, resumed = tmp_path / "reference", tmp_path / "saved", tmp_path / "resumed"
    assert main(run_args(glue_dir, tiny_deberta, reference)) == 0
    assert main(run_args(glue_dir, tiny_deberta, saved, "--save-steps", "8", "--save-total-limit", "0")) == 0
    checkpoint = saved / "checkpoints" / "checkpoint-16"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["epoch"] == 2.0  # the second epoch's end
    assert main(run_args(glue_dir, tiny_deberta, resumed, "--resume-from-checkpoint", str(checkpoint))) == 0
    assert_same_run(reference, resumed)
