"""The two-phase learning-rate multiplier and AdaLoRA's default phases, checked at hand-worked points."""

import math

import pytest

from bayes_adalora.schedules import default_adalora_phases, two_phase


def test_two_phase_matches_the_paper_description():
    # CoLA: warm-up 100 to 2.0, 2.0 until step 500, then from 0.4 down to 0 at the last step (1500)
    f = lambda s: two_phase(s, 100, 500, 2.0, 0.4, 1500)  # noqa: E731
    assert f(0) == 0.0
    assert f(50) == pytest.approx(1.0)
    assert f(100) == 2.0 and f(499) == 2.0
    assert f(500) == pytest.approx(0.4)
    assert f(1000) == pytest.approx(0.2)
    assert f(1500) == 0.0


GLUE_TRAIN_SIZES = {"mnli": 392702, "sst2": 67349, "cola": 8551, "qqp": 363846, "qnli": 104743, "rte": 2490,
                    "mrpc": 3668, "stsb": 5749}  # the GLUE training sets' sizes


def paper_phases() -> dict[str, tuple[int, int, int, int]]:
    """Per GLUE task, (total steps, tinit, tfinal, delta_t) of the paper's runs at batch 32."""
    from bayes_adalora.recipes import PAPER_GLUE

    return {task: (math.ceil(t.epochs * math.ceil(GLUE_TRAIN_SIZES[task] / 32)), t.tinit, t.tfinal, t.delta_t)
            for task, t in PAPER_GLUE.items()}


@pytest.mark.parametrize("task", list(GLUE_TRAIN_SIZES))
def test_default_phases_fall_within_the_papers_proportions(task):
    papers = paper_phases()
    tinit_shares = [ti / total for total, ti, _, _ in papers.values()]
    tfinal_shares = [tf / total for total, _, tf, _ in papers.values()]
    maskings = [(total - ti - tf) // dt for total, ti, tf, dt in papers.values()]
    total = papers[task][0]
    tinit, tfinal, delta_t = default_adalora_phases(total)
    assert min(tinit_shares) <= tinit / total <= max(tinit_shares)
    assert min(tfinal_shares) <= tfinal / total <= max(tfinal_shares)
    assert min(maskings) <= (total - tinit - tfinal) // delta_t <= max(maskings)


@pytest.mark.parametrize("total", [20, 150, 300])
def test_default_phases_of_short_runs_mask_at_every_step_of_the_fall(total):
    tinit, tfinal, delta_t = default_adalora_phases(total)
    assert 0 < tinit < total - tfinal and delta_t == 1
