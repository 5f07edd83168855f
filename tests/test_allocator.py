"""The posterior allocator against peft's own RankAllocator, and IVON's state read back per parameter."""

import copy
import math

import ivon
import pytest
import torch
from peft import AdaLoraConfig, get_peft_model
from peft.tuners.adalora.layer import RankAllocator

import bayes_adalora.allocator as allocator_module
from bayes_adalora.allocator import install_posterior_allocator
from bayes_adalora.importance import POSTERIOR_CRITERIA, posterior_score
from bayes_adalora.posterior import posterior_hessian, posterior_sigma


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(12, 10)
        self.second = torch.nn.Linear(10, 8)
        self.third = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.third(torch.tanh(self.second(torch.tanh(self.first(x)))))


def adalora_net(total_step=40, tinit=5, tfinal=10, delta_t=3, seed=0):
    torch.manual_seed(seed)
    config = AdaLoraConfig(
        init_r=5, target_r=2, tinit=tinit, tfinal=tfinal, deltaT=delta_t, total_step=total_step,
        target_modules=["first", "second", "third"],
    )
    model = get_peft_model(Net(), config)
    with torch.no_grad():  # peft starts lambda at 0; give every triplet a distinct, nonzero state
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p))
    return model


def ivon_with_random_hessian(model, seed=1):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = ivon.IVON(params, lr=0.1, ess=500.0, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for group in optimizer.param_groups:
        group["hess"] = torch.rand(group["hess"].shape, generator=gen) * 5 + 0.01
    return optimizer


def test_posterior_sigma_maps_flat_state_to_each_parameter():
    a = torch.nn.Parameter(torch.zeros(2, 3))
    b = torch.nn.Parameter(torch.zeros(4))
    optimizer = ivon.IVON([a, b], lr=0.1, ess=10.0, weight_decay=0.5)
    optimizer.param_groups[0]["hess"] = torch.arange(10, dtype=torch.float32)
    sigma = posterior_sigma(optimizer)
    # b holds flat entries 6..9: sigma = 1 / sqrt(10 * (h + 0.5))
    assert torch.allclose(sigma[b], torch.tensor([1 / math.sqrt(10 * (h + 0.5)) for h in (6, 7, 8, 9)]))
    assert sigma[a].shape == (2, 3)
    assert sigma[a][1, 2].item() == pytest.approx(1 / math.sqrt(10 * 5.5))
    assert torch.equal(posterior_hessian(optimizer)[a], torch.arange(6, dtype=torch.float32).view(2, 3))


@pytest.mark.parametrize("criterion", POSTERIOR_CRITERIA)
def test_masks_equal_peft_allocator_fed_the_same_scores(criterion):
    """Same schedule, triplet score, threshold and masking as peft: peft's own allocator, given the
    posterior score as its smoothed sensitivity (uncertainty 1), masks exactly the same triplets."""
    ours = adalora_net()
    reference = copy.deepcopy(ours)
    optimizer = ivon_with_random_hessian(ours)
    allocator = install_posterior_allocator(ours, optimizer, criterion)

    ref_alloc = RankAllocator(reference.base_model.model, reference.peft_config["default"], "default")
    sigmas = posterior_sigma(optimizer)
    ours_params = dict(ours.base_model.model.named_parameters())
    for name, p in reference.base_model.model.named_parameters():
        if "lora_" in name and "ranknum" not in name:
            ref_alloc.exp_avg_ipt[name] = posterior_score(criterion, p.detach(), sigmas[ours_params[name]])
            ref_alloc.exp_avg_unc[name] = torch.ones_like(p)

    for budget in (12, 9, 6):
        pattern = allocator.mask_to_budget(ours.base_model.model, budget)
        ref_pattern = ref_alloc.mask_to_budget(reference.base_model.model, budget)
        assert pattern == ref_pattern
        assert sum(sum(v) for v in pattern.values()) == budget
        for (n1, p1), (n2, p2) in zip(ours.named_parameters(), reference.named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2)


def test_scores_only_at_allocation_steps(monkeypatch):
    total, tinit, tfinal, delta_t = 40, 5, 10, 3
    model = adalora_net(total, tinit, tfinal, delta_t)
    optimizer = ivon_with_random_hessian(model)
    install_posterior_allocator(model, optimizer, "snr_abs")
    calls = []
    real = allocator_module.posterior_score
    monkeypatch.setattr(allocator_module, "posterior_score", lambda *a: calls.append(1) or real(*a))

    for step in range(1, total + 1):
        for p in model.parameters():  # peft's sensitivity path would read these; ours must not need them
            p.grad = None
        model.base_model.update_and_allocate(step)

    # Allocation steps by AdaLoRA's schedule: multiples of delta_t strictly inside (tinit, total - tfinal],
    # and the forced final mask at total - tfinal.
    mask_steps = {s for s in range(tinit + 1, total - tfinal) if s % delta_t == 0} | {total - tfinal}
    assert len(calls) == len(mask_steps)  # one flat evaluation per allocation
    ranks = [int((m.lora_E["default"] != 0).sum()) for m in (model.base_model.model.first,
                                                             model.base_model.model.second,
                                                             model.base_model.model.third)]
    assert sum(ranks) == 2 * 3  # target_r per adapted matrix


def test_unknown_criterion_is_refused():
    model = adalora_net()
    with pytest.raises(ValueError, match="unknown posterior criterion"):
        install_posterior_allocator(model, ivon_with_random_hessian(model), "bogus")


def test_tied_scores_keep_exactly_the_budget():
    """At IVON's initial state every sigma is equal, so inv_sigma ties every triplet: peft's
    threshold (mask all <= k-th value) would prune them all; we keep exactly the budget."""
    model = adalora_net()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = ivon.IVON(params, lr=0.1, ess=500.0)  # Hessian = hess_init everywhere
    allocator = install_posterior_allocator(model, optimizer, "inv_sigma")
    pattern = allocator.mask_to_budget(model.base_model.model, 7)
    assert sum(sum(keep) for keep in pattern.values()) == 7
    kept_nonzero = sum(int((m.lora_E["default"] != 0).sum()) for m in (model.base_model.model.first,
                                                                       model.base_model.model.second,
                                                                       model.base_model.model.third))
    assert kept_nonzero == 7


@pytest.mark.parametrize("criterion", POSTERIOR_CRITERIA)
def test_flat_triplet_scores_equal_the_per_matrix_formula(criterion):
    """The allocator's one-pass scores equal S_k = s(lambda_k) + mean_i s(P_ik) + mean_j s(Q_kj)
    computed matrix by matrix from the pure functions."""
    from helpers import triplet_scores

    model = adalora_net()
    optimizer = ivon_with_random_hessian(model)
    allocator = install_posterior_allocator(model, optimizer, criterion)
    # sigma by hand from IVON's flat Hessian: parameters lie in it one after another, in order
    flat, ess, wd = (
        optimizer.param_groups[0]["hess"],
        optimizer.param_groups[0]["ess"],
        optimizer.param_groups[0]["weight_decay"],
    )
    sigmas, offset = {}, 0
    for p in optimizer.param_groups[0]["params"]:
        sigmas[p] = (1.0 / torch.sqrt(ess * (flat[offset : offset + p.numel()] + wd))).view_as(p)
        offset += p.numel()
    expected = []
    for layer in (model.base_model.model.first, model.base_model.model.second, model.base_model.model.third):
        P, E, Q = layer.lora_B["default"], layer.lora_E["default"], layer.lora_A["default"]
        expected.append(triplet_scores(*(posterior_score(criterion, p.detach(), sigmas[p]) for p in (P, E, Q))))
    torch.testing.assert_close(
        allocator.triplet_scores(model.base_model.model), torch.cat(expected), rtol=1e-6, atol=1e-7
    )
