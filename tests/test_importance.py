"""Posterior criteria against Monte Carlo, hand-worked values and their limits."""

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from bayes_adalora.importance import (
    POSTERIOR_CRITERIA,
    folded_normal_mean,
    folded_normal_std,
    posterior_score,
)
from helpers import triplet_scores


def test_folded_normal_matches_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    mu = torch.tensor([0.0, 0.3, -0.7, 1.5, -4.0], dtype=torch.float64)
    sigma = torch.tensor([1.0, 0.5, 0.7, 2.0, 1.0], dtype=torch.float64)
    draws = (mu + sigma * torch.randn(400_000, 5, generator=gen, dtype=torch.float64)).abs()
    mc_mean, mc_std = draws.mean(0), draws.std(0)
    se = mc_std / math.sqrt(draws.shape[0])
    assert torch.all((folded_normal_mean(mu, sigma) - mc_mean).abs() < 5 * se)
    assert torch.allclose(folded_normal_std(mu, sigma), mc_std, rtol=5e-3)
    assert torch.allclose(posterior_score("snr_abs", mu, sigma), mc_mean / mc_std, rtol=5e-3)


def test_folded_normal_agrees_with_scipy_foldnorm():
    # scipy's foldnorm(c) is |X| for X ~ N(c, 1): an independent implementation in float64.
    r = np.array([0.0, 0.01, 0.5, 1.0, 2.5, 4.0, 6.0])
    mu, sigma = torch.tensor(r * 0.3), torch.full((len(r),), 0.3, dtype=torch.float64)
    assert np.allclose(folded_normal_mean(mu, sigma).numpy(), 0.3 * stats.foldnorm.mean(r), rtol=1e-10)
    assert np.allclose(folded_normal_std(mu, sigma).numpy(), 0.3 * stats.foldnorm.std(r), rtol=1e-8)


def test_hand_worked_values_at_zero_mean():
    sigma = torch.tensor([0.5])
    zero = torch.zeros(1)
    # |theta| is half-normal: mean sigma sqrt(2/pi), variance sigma^2 (1 - 2/pi)
    assert posterior_score("e_abs", zero, sigma).item() == pytest.approx(0.5 * math.sqrt(2 / math.pi), rel=1e-6)
    expected = math.sqrt(2 / math.pi) / math.sqrt(1 - 2 / math.pi)
    assert posterior_score("snr_abs", zero, sigma).item() == pytest.approx(expected, rel=1e-6)
    assert posterior_score("snr", zero, sigma).item() == 0.0
    assert posterior_score("mean_abs", zero, sigma).item() == 0.0
    assert posterior_score("inv_sigma", zero, sigma).item() == pytest.approx(2.0)


def test_simple_criteria():
    mu = torch.tensor([-2.0, 3.0])
    sigma = torch.tensor([0.5, 4.0])
    assert torch.equal(posterior_score("snr", mu, sigma), torch.tensor([4.0, 0.75]))
    assert torch.equal(posterior_score("mean_abs", mu, sigma), torch.tensor([2.0, 3.0]))
    assert torch.equal(posterior_score("inv_sigma", mu, sigma), torch.tensor([2.0, 0.25]))


@pytest.mark.parametrize("r", [0.0, 1e-6, 0.1, 1.0, 3.0, 5.0, 8.0, 10.0, 30.0, 1e2, 1e3, 1e4, 1e5, 1e6])
def test_snr_abs_float32_accurate_at_any_ratio(r):
    """float32 inputs at |mu|/sigma from 0 to 1e6: finite and within float32 precision of a float64 reference."""
    sigma32 = torch.tensor([1e-3], dtype=torch.float32)
    mu32 = torch.tensor([r * 1e-3], dtype=torch.float32)
    got = posterior_score("snr_abs", mu32, sigma32)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # Reference in float64 from the textbook formula, where it is still well conditioned,
    # and from the asymptotic series E|t|/sd|t| = r + O(exp(-r^2/2)) beyond.
    r64 = float(mu32.double() / sigma32.double())
    if r64 < 8:
        e = math.sqrt(2 / math.pi) * math.exp(-r64**2 / 2) + r64 * special.erf(r64 / math.sqrt(2))
        ref = e / math.sqrt(r64**2 + 1 - e**2)
    else:
        ref = r64
    assert got.item() == pytest.approx(ref, rel=3e-7, abs=1e-7)
    assert posterior_score("e_abs", mu32, sigma32).item() == pytest.approx(
        ref * 1e-3 if r64 >= 8 else e * 1e-3, rel=3e-7
    )


def test_large_ratio_limit_is_snr():
    mu = torch.tensor([5.0, -7.0, 1e3], dtype=torch.float32)
    sigma = torch.tensor([0.1, 0.01, 1e-3], dtype=torch.float32)
    assert torch.allclose(posterior_score("snr_abs", mu, sigma), posterior_score("snr", mu, sigma), rtol=1e-6)


def test_an_infinite_ratio_scores_as_snr_and_not_nan():
    """sigma 0, or |mu|/sigma past float32's range: r = inf, where the formulas' inf * 0 gave NaN (a NaN score
    sorts as no other, so such a triplet's place in the ranking was arbitrary)."""
    mu = torch.tensor([1e-3, -2.0], dtype=torch.float32)
    sigma = torch.tensor([0.0, 1e-45], dtype=torch.float32)
    assert torch.equal(posterior_score("snr_abs", mu, sigma), torch.tensor([math.inf, math.inf]))
    assert torch.equal(posterior_score("e_abs", mu, sigma), mu.abs())
    assert torch.equal(folded_normal_std(mu, sigma), torch.tensor([0.0, 1e-45]))


def test_scores_are_elementwise_and_shape_preserving():
    mu = torch.randn(3, 4)
    sigma = torch.rand(3, 4) + 0.1
    for criterion in POSTERIOR_CRITERIA:
        full = posterior_score(criterion, mu, sigma)
        assert full.shape == mu.shape
        assert torch.allclose(full[1:2, 2:3], posterior_score(criterion, mu[1:2, 2:3], sigma[1:2, 2:3]))


def test_unknown_criterion_raises():
    with pytest.raises(ValueError, match="unknown posterior criterion"):
        posterior_score("fisher", torch.ones(1), torch.ones(1))


def test_the_reference_triplet_score_hand_worked():
    score_p = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # (out=3, r=2)
    score_lambda = torch.tensor([[10.0], [20.0]])
    score_q = torch.tensor([[1.0, 1.0, 4.0, 2.0], [0.0, 0.0, 0.0, 8.0]])  # (r=2, in=4)
    # k=0: 10 + mean(1,3,5) + mean(1,1,4,2) = 10 + 3 + 2 = 15; k=1: 20 + 4 + 2 = 26
    assert torch.equal(triplet_scores(score_p, score_lambda, score_q), torch.tensor([15.0, 26.0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sigma_of_a_half_precision_hessian_is_computed_in_float32(dtype):
    from bayes_adalora.posterior import posterior_sigma_from_hessian

    sigma = posterior_sigma_from_hessian(torch.ones(4, dtype=dtype), 67349.0, 1e-8)  # SST-2's ess; fp16 overflows
    assert sigma.dtype == torch.float32
    torch.testing.assert_close(sigma, torch.full((4,), 67349.0**-0.5))
