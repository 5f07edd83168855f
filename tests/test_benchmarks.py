"""benchmarks/speed.py: methods interleaved on the same batches, memory measured alone (Mini-GLUE v1's grid tests
went with benchmarks/mini_glue.py; the grids of v2 and v3 have their own test files)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_speed_interleaves_methods_and_measures_each_ones_memory_alone(tmp_path, monkeypatch):
    from conftest import SHARED_GLUE

    if not (SHARED_GLUE / "SST-2").is_dir():
        pytest.skip("GLUE files not beside the checkout")
    import speed

    monkeypatch.setattr(speed, "GLUE", SHARED_GLUE)
    monkeypatch.setenv("GLUE_DIR", str(SHARED_GLUE))  # the fresh memory processes read it too
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["--setting", "cpu", "--methods", "bayes-adalora", "lora", "--steps", "2", "--warmup", "1",
            "--memory-steps", "2", "--threads", "1", "--out", str(tmp_path)]
    assert speed.main(args) == 0
    # never speed-cpu.json
    result = json.loads((tmp_path / "speed-cpu-peft-adalora-bayes-adalora-lora.json").read_text())
    rows = result["methods"]
    assert list(rows) == ["peft-adalora", "bayes-adalora", "lora"]
    assert rows["peft-adalora"]["ratio_to_peft_adalora"] == 1.0
    assert result["memory_steps"] == 2 and result["machine"].endswith("1 threads")
    assert set(result["load_average_1min"]) == {"before", "after_timing"}
    for row in rows.values():
        assert 0 < row["forward_backward_s"] < row["step_s"] and row["optimizer_s"] > 0
        # MiniLM's fp32 weights alone are about 90 MB; training adds activations and optimizer state
        assert row["peak_rss_mb"] > 300 and 0 < row["training_adds_rss_mb"] < row["peak_rss_mb"]
    assert rows["lora"]["ratio_to_lora"] == 1.0 and rows["bayes-adalora"]["ratio_to_lora"] > 0


def test_mc_temperature_draws_from_the_posterior_widened_by_the_temperature_and_nothing_else(
        tmp_path, glue_dir, tiny_deberta):
    """At T 1 the benchmark's predictive is `evaluate --mc-samples`'s own, number for number; a large T reaches the
    draws (the predictive moves) but not the posterior mean (the point metrics stay)."""
    import helpers
    import mc_temperature
    from bayes_adalora.cli import main
    from bayes_adalora.run_io import evaluate_run

    out = tmp_path / "run"
    assert main(helpers.train_argv(glue_dir, tiny_deberta, out, "--method", "bayes-adalora", max_steps=4,
                                   max_length=32)) == 0
    reference = evaluate_run(out, data_dir=str(glue_dir), mc_samples=2, device="cpu")["metrics"]
    at_one = mc_temperature.evaluate_at(out, glue_dir, 1.0, 2, "sst2")
    pick = mc_temperature.pick
    assert at_one == {"point": pick(reference["point"], "sst2"), "mc": pick(reference["mc"], "sst2")}
    wide = mc_temperature.evaluate_at(out, glue_dir, 1e8, 2, "sst2")
    assert wide["point"] == at_one["point"] and abs(wide["mc"]["nll"] - at_one["mc"]["nll"]) > 1e-3


def test_mask_agreement_scores_triplets_as_the_paper_defines_them_and_counts_differing_flags(tmp_path):
    """S_k = s(lambda_k) + mean_i s(P_ik) + mean_j s(Q_kj) by hand for one 3 x 2 matrix at rank 2 (P is out x r,
    Q is r x in); two runs' patterns differing in one flag of one matrix; the same-state correlations of a kept set."""
    import torch
    from safetensors.torch import save_file

    import mask_agreement

    name = "base_model.model.enc.query.{}.default.{}"
    mu = {"lora_B": torch.tensor([[1.0, -2.0], [3.0, 0.0], [-5.0, 4.0]]), "lora_E": torch.tensor([[0.5], [-1.0]]),
          "lora_A": torch.tensor([[2.0, -4.0], [0.0, 6.0]])}
    posterior = {name.format(part, "mean"): m for part, m in mu.items()}
    posterior |= {name.format(part, "sigma"): torch.full_like(m, 0.5) for part, m in mu.items()}
    scores = mask_agreement.triplet_scores(posterior, "mean_abs", ["enc.query.lora_E"])
    # k = 0: 0.5 + (1 + 3 + 5) / 3 + (2 + 4) / 2 = 6.5; k = 1: 1 + (2 + 0 + 4) / 3 + (0 + 6) / 2 = 6
    assert torch.allclose(scores, torch.tensor([6.5, 6.0]))
    # sigma is the same everywhere, so inv_sigma ties and snr orders as mean_abs does
    assert torch.allclose(mask_agreement.triplet_scores(posterior, "snr", ["enc.query.lora_E"]), scores / 0.5)

    a = {"enc.query.lora_E": [True, False], "enc.value.lora_E": [True, True]}
    b = {"enc.query.lora_E": [True, True], "enc.value.lora_E": [True, True]}
    assert mask_agreement.compare_patterns(a, a)["flags_differ"] == 0
    assert mask_agreement.compare_patterns(a, b) == {"triplets": 4, "flags_differ": 0.25, "matrices_rank_differs": 1,
                                                     "matrices": 2}
    with pytest.raises(ValueError, match="different models"):
        mask_agreement.compare_patterns(a, {"enc.query.lora_E": [True, False]})

    run = tmp_path / "grid" / "sst2" / "bayes-adalora-seed0"
    (run / "adapter").mkdir(parents=True)
    (run / "results.json").write_text("{}")
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"rank_pattern": {"enc.query.lora_E": [1, 1]}}))
    save_file(posterior, run / "posterior.safetensors")
    state = mask_agreement.same_state(run, mask_agreement.final_pattern(run))
    assert state["snr"] == pytest.approx(1.0) and state["mean_abs"] == pytest.approx(1.0)
    assert state["inv_sigma"] != state["inv_sigma"]  # constant scores: no correlation (NaN), not a made-up one


def test_the_input_blind_training_loss_is_the_label_entropy_or_variance(tmp_path):
    """Three positive and one negative sentence: -(3/4 ln 3/4 + 1/4 ln 1/4) = 0.5623; STS-B scores 0, 1, 2, 5:
    mean 2, variance (4 + 1 + 0 + 9) / 4 = 3.5."""
    from baselines import constant_train_loss

    sst2, stsb = tmp_path / "SST-2", tmp_path / "STS-B"
    sst2.mkdir(), stsb.mkdir()
    rows = "sentence\tlabel\n" + "".join(f"s{i}\t{y}\n" for i, y in enumerate((1, 1, 0, 1)))
    (sst2 / "train.tsv").write_text(rows), (sst2 / "dev.tsv").write_text(rows)
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    rows = head + "".join(f"{i}\tg\tf\ty\t{i}\ts\ts\ta{i}\tb{i}\t{y}\n" for i, y in enumerate((0, 1, 2, 5)))
    (stsb / "train.tsv").write_text(rows), (stsb / "dev.tsv").write_text(rows)
    assert constant_train_loss("sst2", str(tmp_path)) == pytest.approx(0.562335, abs=1e-6)
    assert constant_train_loss("stsb", str(tmp_path)) == pytest.approx(3.5)
