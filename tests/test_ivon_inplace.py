"""The in-place IVON against ivon-opt itself: bitwise on an elementwise loss, close after model steps,
state_dicts interchangeable, and parameters whose `.data` is reassigned pulled back into the buffer."""

import copy

import ivon
import pytest
import torch

from bayes_adalora.ivon_inplace import InplaceIVON

SHAPES = [(5, 7), (3,), (11, 2), (64,)]
TARGETS = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(SHAPES)]


def elementwise_setup(cls, **kwargs):
    """Two parameter groups (another lr in the second), non-default IVON settings that all take part."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    settings = dict(lr=0.1, ess=100.0, hess_init=0.3, weight_decay=1e-3, clip_radius=0.5, beta2=0.9, mc_samples=2)
    optimizer = cls([{"params": params[:2]}, {"params": params[2:], "lr": 0.05}], **{**settings, **kwargs})
    return params, optimizer


def elementwise_steps(params, optimizer, steps, samples=2, seed=1):
    """A loss whose Hessian is not constant: sum (p - t)^2 (1 + |p|)."""
    torch.manual_seed(seed)
    for _ in range(steps):
        for _ in range(samples):
            with optimizer.sampled_params(train=True):
                optimizer.zero_grad(set_to_none=True)
                loss = sum(((p - t) ** 2 * (1 + p.abs())).sum() for p, t in zip(params, TARGETS))
                loss.backward()
        optimizer.step()


def assert_same_state(a, b, params_a, params_b):
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa, pb)
    for ga, gb in zip(a.param_groups, b.param_groups):
        assert torch.equal(ga["hess"], gb["hess"]) and torch.equal(ga["momentum"], gb["momentum"])
    assert a.current_step == b.current_step


@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
def test_bitwise_equal_to_ivon_opt_on_an_elementwise_loss(hess_approx):
    reference = elementwise_setup(ivon.IVON, hess_approx=hess_approx)
    ours = elementwise_setup(InplaceIVON, hess_approx=hess_approx)
    elementwise_steps(*reference, steps=50)
    elementwise_steps(*ours, steps=50)
    assert_same_state(reference[1], ours[1], reference[0], ours[0])
    assert not torch.equal(reference[0][0], elementwise_setup(ivon.IVON)[0][0])  # it did move


def test_parameters_are_views_of_one_buffer_and_nothing_is_allocated_per_step():
    params, optimizer = elementwise_setup(InplaceIVON)
    flat = optimizer._flat
    assert all(p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in params)
    hess = [g["hess"] for g in optimizer.param_groups]
    elementwise_steps(params, optimizer, steps=3)
    assert all(p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in params)
    assert all(g["hess"] is h for g, h in zip(optimizer.param_groups, hess))  # updated in place


def test_adopting_an_existing_ivon_keeps_the_object_and_its_numbers():
    reference = elementwise_setup(ivon.IVON)
    params, optimizer = elementwise_setup(ivon.IVON)
    assert InplaceIVON.adopt(optimizer) is optimizer and isinstance(optimizer, ivon.IVON)
    elementwise_steps(*reference, steps=10)
    elementwise_steps(params, optimizer, steps=10)
    assert_same_state(reference[1], optimizer, reference[0], params)
    with pytest.raises(TypeError):
        InplaceIVON.adopt(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))


def test_state_dicts_load_either_way_and_the_runs_go_on_identically():
    """A checkpoint of either optimizer continues bitwise in the other; a saved state_dict does not move."""
    reference = elementwise_setup(ivon.IVON)
    ours = elementwise_setup(InplaceIVON)
    elementwise_steps(*reference, steps=5)
    elementwise_steps(*ours, steps=5)
    saved = ours[1].state_dict()
    before = copy.deepcopy(saved)
    elementwise_steps(*ours, steps=1, seed=7)
    assert torch.equal(saved["param_groups"][1]["hess"], before["param_groups"][1]["hess"])
    assert set(saved) == set(reference[1].state_dict()) and saved["state"] == {"count": 0, "avg_grad": None,
                                                                                "avg_nxg": None, "avg_gsq": None}

    # ours -> ivon-opt, and ivon-opt -> ours, from step 5; each then goes 5 steps next to its twin
    into_stock = elementwise_setup(ivon.IVON)
    into_ours = elementwise_setup(InplaceIVON)
    with torch.no_grad():
        for a, b, p in zip(into_stock[0], into_ours[0], reference[0]):
            a.copy_(p)
            b.copy_(p)
    into_stock[1].load_state_dict(before)
    into_stock[1].current_step = 5
    into_ours[1].load_state_dict(reference[1].state_dict())
    into_ours[1].current_step = 5
    elementwise_steps(*reference, steps=5, seed=3)
    elementwise_steps(*into_stock, steps=5, seed=3)
    elementwise_steps(*into_ours, steps=5, seed=3)
    assert_same_state(reference[1], into_stock[1], reference[0], into_stock[0])
    assert_same_state(reference[1], into_ours[1], reference[0], into_ours[0])


def test_a_reassigned_parameter_is_pulled_back_into_the_buffer():
    reference = elementwise_setup(ivon.IVON)
    params, optimizer = elementwise_setup(InplaceIVON)
    elementwise_steps(*reference, steps=3)
    elementwise_steps(params, optimizer, steps=3)
    params[2].data = params[2].data.clone()  # e.g. model.to(...), or a posterior draw that kept its copy
    params[0].data = params[0].data + 0  # another tensor, same values
    elementwise_steps(*reference, steps=3, seed=4)
    elementwise_steps(params, optimizer, steps=3, seed=4)
    assert_same_state(reference[1], optimizer, reference[0], params)
    assert params[2].data_ptr() == optimizer._views[2].data_ptr()


def test_a_frozen_parameter_counts_as_zero_gradient_as_in_ivon_opt():
    def setup(cls):
        params, optimizer = elementwise_setup(cls)
        params[1].requires_grad_(False)
        return params, optimizer

    reference, ours = setup(ivon.IVON), setup(InplaceIVON)
    elementwise_steps(*reference, steps=4)
    elementwise_steps(*ours, steps=4)
    assert_same_state(reference[1], ours[1], reference[0], ours[0])


def test_within_1e5_of_ivon_opt_after_100_steps_of_an_adalora_model(tiny_deberta):
    from peft import AdaLoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_deberta, num_labels=2)
    config = AdaLoraConfig(task_type=TaskType.SEQ_CLS, init_r=4, target_r=2, total_step=100, tinit=10, tfinal=20,
                           deltaT=10, target_modules=["query_proj", "value_proj"])
    first = get_peft_model(base, config)
    second = copy.deepcopy(first)
    initial = [p.detach().clone() for p in first.parameters()]
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(5, 1000, (8, 12), generator=gen),
                "labels": torch.randint(0, 2, (8,), generator=gen)} for _ in range(10)]

    def train(model, cls):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = cls(params, lr=0.5, ess=1000.0, weight_decay=1e-4, clip_radius=1e-3)
        torch.manual_seed(1)
        for step in range(100):
            with optimizer.sampled_params(train=True):
                optimizer.zero_grad(set_to_none=True)
                model(**batches[step % 10]).loss.backward()
            optimizer.step()
        return optimizer

    reference, ours = train(first, ivon.IVON), train(second, InplaceIVON)
    diffs = [(a - b).abs().max().item() for a, b in zip(first.parameters(), second.parameters())]
    assert max(diffs) <= 1e-5
    groups = zip(reference.param_groups, ours.param_groups)
    hess_diffs = [(ga["hess"] - gb["hess"]).abs().max().item() for ga, gb in groups]
    assert max(hess_diffs) <= 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(first.parameters(), initial)) > 1e-4  # it did train
