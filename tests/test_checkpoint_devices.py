"""Checkpoints read onto the CPU go back to the parameters' device (tested with parameters on the meta device);
IVON and the weights' dtype."""

from types import SimpleNamespace

import ivon
import pytest
import torch
from torch import nn

from bayes_adalora.build import make_optimizer
from bayes_adalora.checkpoint import load_allocator_state, place_ivon_state
from bayes_adalora.config import TrainConfig
from bayes_adalora.errors import UserError


def test_ivon_groups_follow_their_parameters_after_load_state_dict():
    here = ivon.IVON([nn.Parameter(torch.zeros(3))], lr=0.1, ess=10)
    elsewhere = ivon.IVON([nn.Parameter(torch.zeros(3, device="meta"))], lr=0.1, ess=10)
    elsewhere.load_state_dict(here.state_dict())
    assert elsewhere.param_groups[0]["hess"].device.type == "cpu"  # what torch leaves: the file's device
    place_ivon_state(elsewhere)
    assert {elsewhere.param_groups[0][k].device.type for k in ("hess", "momentum")} == {"meta"}


def test_allocator_emas_go_to_their_parameters_devices():
    model = nn.Module()
    model.a = nn.Parameter(torch.zeros(2, device="meta"))
    model.b = nn.Parameter(torch.zeros(2))
    alloc = SimpleNamespace(ipt={}, exp_avg_ipt={}, exp_avg_unc={})
    tuner = SimpleNamespace(model=model, rankallocator=alloc, trainable_adapter_name="default",
                            peft_config={"default": SimpleNamespace(rank_pattern=None)})
    saved = {"a": torch.ones(2), "b": torch.ones(2)}
    load_allocator_state(tuner, {"ipt": saved, "exp_avg_ipt": saved, "exp_avg_unc": saved, "rank_pattern": {"x": [1]}})
    for ema in (alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc):
        assert (ema["a"].device.type, ema["b"].device.type) == ("meta", "cpu")
    assert tuner.peft_config["default"].rank_pattern == {"x": [1]}


def test_ivon_refuses_half_precision_weights_in_one_sentence():
    """fp16: ess x Hessian overflows. bf16: 0.99999 * h + 1e-5 * update rounds back to h (checked below)."""
    model = nn.Linear(2, 2).half()
    with pytest.raises(UserError, match=r"^--method bayes-adalora cannot train fp16 weights .* overflows"):
        make_optimizer(model, TrainConfig(), ess=67349.0, total_steps=100)
    make_optimizer(model, TrainConfig(method="adalora"), ess=67349.0, total_steps=100)  # AdamW has no such product
    with pytest.raises(UserError, match=r"^--method adalora-ivon cannot train bf16 weights .* cannot move"):
        make_optimizer(nn.Linear(2, 2).bfloat16(), TrainConfig(method="adalora-ivon"), ess=67349.0, total_steps=100)
    h = torch.ones(1, dtype=torch.bfloat16)
    assert torch.equal(0.99999 * h + 1e-5 * (5 * h), h)  # IVON's Hessian average with beta2 0.99999, in bf16
    make_optimizer(nn.Linear(2, 2), TrainConfig(), ess=67349.0, total_steps=100)
