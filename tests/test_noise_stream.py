"""IVON's noise from a stream of its own: the same draws whatever else used the global generator."""

import ivon
import pytest
import torch
from torch import nn

from bayes_adalora.steps import IVONStep, NoiseStream


def train(noise: NoiseStream | None, dropout_draws: int, steps: int = 5) -> ivon.IVON:
    """IVON on a quadratic; before each sample, 'dropout' takes `dropout_draws` numbers from the global generator."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.linspace(-1, 1, 6))
    optimizer = ivon.IVON([weight], lr=0.1, ess=100)
    step = IVONStep(optimizer, samples=2, noise=noise)

    def forward_backward():
        torch.rand(dropout_draws)
        loss = (weight - 0.5).pow(2).sum()
        loss.backward()
        return loss

    for _ in range(steps):
        step.gradients(forward_backward)
        step.update()
    return optimizer


def test_processes_whose_dropout_draws_differ_still_sample_the_same_noise():
    one, other = train(NoiseStream(7), dropout_draws=10), train(NoiseStream(7), dropout_draws=11)
    assert torch.equal(one.param_groups[0]["hess"], other.param_groups[0]["hess"])
    assert torch.equal(one.param_groups[0]["params"][0], other.param_groups[0]["params"][0])
    # from the global generator (seeded alike), the same two runs part ways
    one, other = train(None, dropout_draws=10), train(None, dropout_draws=11)
    assert not torch.equal(one.param_groups[0]["hess"], other.param_groups[0]["hess"])


def test_drawing_leaves_the_global_generator_where_it_was_and_the_stream_advances():
    stream = NoiseStream(3)
    start = stream.state["cpu"].clone()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with stream.drawing():
        first = torch.randn(4)
    assert torch.equal(torch.get_rng_state(), before)
    with stream.drawing():
        second = torch.randn(4)
    assert not torch.equal(first, second)
    stream.load_state({"cpu": start, "cuda": torch.zeros(1)})  # a GPU checkpoint on the CPU: the draws repeat
    assert set(stream.state) == {"cpu"}
    with stream.drawing():
        assert torch.equal(torch.randn(4), first)


def test_the_stream_is_not_the_seeds_own_sequence_and_depends_on_the_seed():
    torch.manual_seed(3)
    seeds_own = torch.randn(4)  # what initialised the run's new weights
    draws = {}
    for seed in (3, 4):
        with NoiseStream(seed).drawing():
            draws[seed] = torch.randn(4)
    assert not torch.equal(draws[3], seeds_own) and not torch.equal(draws[3], draws[4])


@pytest.mark.parametrize("fast", [False, True])  # ivon-opt's IVON, and the fast path's InplaceIVON
def test_a_forward_that_raises_leaves_the_mean_weights_and_no_collected_samples(fast):
    """ivon-opt's sampled_params has no finally: an out-of-memory error mid-step (auto_find_batch_size retries)
    left the weights at mean + noise and the step's first samples in IVON's averages."""
    from bayes_adalora.fast_adalora import enable_fast_optimizer

    weight = nn.Parameter(torch.linspace(-1, 1, 6))
    optimizer = ivon.IVON([weight], lr=0.1, ess=100)
    if fast:
        enable_fast_optimizer(optimizer)
    mean = weight.detach().clone()
    calls = []

    def forward_backward():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        loss = (weight - 0.5).pow(2).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="out of memory"):
        IVONStep(optimizer, samples=2, noise=NoiseStream(0)).gradients(forward_backward)
    assert torch.equal(weight.detach(), mean)
    assert optimizer.state["count"] == 0 and optimizer.state["avg_grad"] is None
    calls.append(1)  # a retry: two clean samples from the mean
    IVONStep(optimizer, samples=2, noise=NoiseStream(0)).gradients(forward_backward)
    assert optimizer.state["count"] == 2 and torch.equal(weight.detach(), mean)
