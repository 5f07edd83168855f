"""`bayes-adalora train` runs on transformers.Trainer: what the Trainer gives the command line (gradient
accumulation, gradient checkpointing, its schedules) checked against the run without them or against
transformers' own functions."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import get_cosine_schedule_with_warmup

from bayes_adalora.cli import main
from conftest import save_tiny_deberta
from helpers import refused, train_argv


@pytest.fixture(scope="module")
def tiny_deberta_no_dropout(tmp_path_factory):
    """Without dropout, two half batches and one whole batch see the same network."""
    return save_tiny_deberta(tmp_path_factory.mktemp("tiny-deberta-nodrop"), hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0, pooler_dropout=0.0)


def args(glue_dir, model, out, *extra):
    return train_argv(glue_dir, model, out, *extra, max_steps=8, batch_size=16, max_length=32, eval_steps=8)


def relative_gap(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() / (a[k].abs().max().item() + 1e-12) for k in a if a[k].numel())


def test_gradient_accumulation_steps_on_the_mean_gradient_of_the_whole_batch(tmp_path, glue_dir,
                                                                            tiny_deberta_no_dropout):
    """AdamW on 2 micro-batches of 8 (given per device, as the Trainer counts them) against 1 batch of 16: the
    same mean gradient, so the same run, up to the order of float sums."""
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert main(args(glue_dir, tiny_deberta_no_dropout, whole, "--method", "adalora")) == 0
    assert main(train_argv(glue_dir, tiny_deberta_no_dropout, halves, "--method", "adalora",  # no --batch-size
                           max_steps=8, max_length=32, eval_steps=8, per_device_train_batch_size=8,
                           gradient_accumulation_steps=2)) == 0
    assert json.loads((halves / "config.json").read_text())["batch_size"] == 16  # the Trainer's count: 8 x 1 x 2
    a, b = (json.loads((r / "history.json").read_text()) for r in (whole, halves))
    assert len(b["loss"]) == 8 and max(abs(x - y) for x, y in zip(a["loss"], b["loss"])) < 1e-5
    weights = [load_file(r / "adapter" / "adapter_model.safetensors") for r in (whole, halves)]
    assert relative_gap(*weights) < 1e-4
    results = [json.loads((r / "results.json").read_text()) for r in (whole, halves)]
    assert results[0]["final_ranks"] == results[1]["final_ranks"]


def test_gradient_checkpointing_recomputes_the_same_run(tmp_path, glue_dir, tiny_deberta_no_dropout):
    kept, recomputed = tmp_path / "kept", tmp_path / "recomputed"
    assert main(args(glue_dir, tiny_deberta_no_dropout, kept)) == 0
    assert main(args(glue_dir, tiny_deberta_no_dropout, recomputed, "--gradient-checkpointing")) == 0
    a, b = (json.loads((r / "history.json").read_text()) for r in (kept, recomputed))
    assert max(abs(x - y) for x, y in zip(a["loss"], b["loss"])) < 1e-5
    weights = [load_file(r / "adapter" / "adapter_model.safetensors") for r in (kept, recomputed)]
    assert relative_gap(*weights) < 1e-4


def test_a_batch_that_does_not_split_into_micro_batches_is_refused(capfd, tmp_path, glue_dir, tiny_deberta):
    out = tmp_path / "run"
    line = refused(capfd, args(glue_dir, tiny_deberta, out, "--gradient-accumulation-steps", "3"))
    assert "--batch-size 16 must split into --gradient-accumulation-steps 3" in line
    assert not out.exists()


def test_the_run_follows_transformers_cosine_schedule(tmp_path, glue_dir, tiny_deberta):
    out = tmp_path / "run"
    assert main(args(glue_dir, tiny_deberta, out, "--method", "adalora", "--lr-scheduler-type", "cosine",
                     "--warmup-steps", "2", "--learning-rate", "0.01")) == 0
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    reference = get_cosine_schedule_with_warmup(optimizer, 2, 8)
    expected = [0.01 * reference.lr_lambdas[0](step) for step in range(1, 9)]  # the lr after each step, as logged
    assert json.loads((out / "history.json").read_text())["lr"] == pytest.approx(expected, abs=1e-12)


def test_the_cli_trains_through_the_trainer_and_its_checkpoints_are_the_trainers(tmp_path, glue_dir, tiny_deberta):
    out = tmp_path / "run"
    assert main(args(glue_dir, tiny_deberta, out, "--save-steps", "4", "--save-total-limit", "0")) == 0
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-4", "checkpoint-8"]
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    run_state = json.loads((out / "checkpoints" / "checkpoint-4" / "bayes-adalora-state.json").read_text())
    history = json.loads((out / "history.json").read_text())
    assert run_state["history"]["loss"] == history["loss"][:4]
