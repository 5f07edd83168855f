"""Learning-rate multipliers and AdaLoRA's default phases, checked at hand-worked points."""

import pytest

from bayes_adalora.schedules import constant_warmup, default_adalora_phases, linear_warmup_decay, two_phase


def test_linear_warmup_decay_points():
    # warm-up 10 of 110 steps: 0, half way, peak, then linear to 0 at step 110
    assert linear_warmup_decay(0, 10, 110) == 0.0
    assert linear_warmup_decay(5, 10, 110) == 0.5
    assert linear_warmup_decay(10, 10, 110) == 1.0
    assert linear_warmup_decay(60, 10, 110) == 0.5
    assert linear_warmup_decay(110, 10, 110) == 0.0
    assert linear_warmup_decay(3, 0, 10) == pytest.approx(0.7)


def test_two_phase_matches_the_paper_description():
    # CoLA: warm-up 100 to 2.0, 2.0 until step 500, then from 0.4 down to 0 at the last step (1500)
    f = lambda s: two_phase(s, 100, 500, 2.0, 0.4, 1500)  # noqa: E731
    assert f(0) == 0.0
    assert f(50) == pytest.approx(1.0)
    assert f(100) == 2.0 and f(499) == 2.0
    assert f(500) == pytest.approx(0.4)
    assert f(1000) == pytest.approx(0.2)
    assert f(1500) == 0.0


def test_constant_warmup():
    assert constant_warmup(0, 4) == 0.0
    assert constant_warmup(2, 4) == 0.5
    assert constant_warmup(400, 4) == 1.0
    # no warm-up: the full lr from the first update, as linear_warmup_decay gives (it used to be 0 there)
    assert constant_warmup(0, 0) == 1.0 == linear_warmup_decay(0, 0, 10)


@pytest.mark.parametrize("total", [20, 300, 6700])
def test_default_phases_leave_a_budgeting_phase(total):
    tinit, tfinal, delta_t = default_adalora_phases(total)
    assert 0 <= tinit < total - tfinal
    assert delta_t >= 1
    falling = total - tinit - tfinal
    assert falling // delta_t >= min(falling, 60)
