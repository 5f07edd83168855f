"""The Trainer path at parity with the CLI: IVONArguments, any task type (a tiny causal LM), compute_metrics,
the posterior predictive for a loop of one's own, resumable checkpoints and load_best_model_at_end."""

import json
import math
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import ivon
import numpy as np
import pytest
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model
from peft.tuners.adalora import AdaLoraLayer
from transformers import DataCollatorWithPadding, EvalPrediction, LlamaConfig, LlamaForCausalLM

from bayes_adalora import UserError
from bayes_adalora.build import build_trainable_model
from bayes_adalora.config import TrainConfig
from bayes_adalora.hf_trainer import (
    ADALORA_STATE,
    AdaLoraTrainer,
    IVONArguments,
    IVONTrainer,
    compute_lm_metrics,
    compute_metrics,
    reduce_lm_logits,
)
from bayes_adalora.models import load_model
from bayes_adalora.predict import posterior_predictive
from conftest import save_tiny_deberta
from test_hf_trainer import SST2, StopAfter, adalora_ranks, read_sst2, trainer_args

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "trainer.md"  # its own-loop recipe


# ----------------------------------------------------------------------------- IVONArguments


def test_ivon_arguments_check_fields_as_train_config_does():
    with pytest.raises(UserError, match=r"--ivon-ess must lie in \(0, inf\), got -1"):
        IVONArguments(ivon_ess=-1)
    with pytest.raises(UserError, match="unknown criterion 'magic'"):
        IVONArguments(criterion="magic")
    with pytest.raises(UserError, match="--train-mc-samples must be a whole number"):
        IVONArguments(train_mc_samples=1.5)
    with pytest.raises(UserError, match="--target-r 8 is larger than --init-r 6"):
        IVONArguments(target_r=8)
    with pytest.raises(ValueError, match=r"trains an AdaLoRA method .*, not 'lora'"):
        IVONArguments(method="lora")
    # the defaults are TrainConfig's, field by field
    defaults = TrainConfig()
    assert all(getattr(IVONArguments(), name) == getattr(defaults, name) for name in IVONArguments.__dataclass_fields__)


def test_ivon_arguments_build_peft_config_with_phases_that_scale_with_the_run():
    config = IVONArguments(init_r=8, target_r=2).adalora_config(1000, ["q_proj"], task_type="CAUSAL_LM")
    assert isinstance(config, AdaLoraConfig)
    # the paper's proportions (schedules.default_adalora_phases): 15% at init_r, 45% at the final pattern
    assert (config.init_r, config.target_r, config.tinit, config.tfinal, config.total_step) == (8, 2, 150, 450, 1000)


# ----------------------------------------------------------------------------- any task type: a tiny causal LM


def tiny_llama_with_adalora(ivon_args: IVONArguments, steps: int, **peft_kwargs):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    peft_config = ivon_args.adalora_config(steps, ["q_proj", "v_proj"], task_type="CAUSAL_LM", **peft_kwargs)
    return get_peft_model(LlamaForCausalLM(config), peft_config)


def counting_sequences(n: int, length: int = 12) -> list[dict]:
    """Token sequences that count up from a random start: a pattern a tiny LM learns in a few steps."""
    rng = np.random.default_rng(0)
    rows = []
    for start in rng.integers(0, 100, n):
        ids = [int(start) + i for i in range(length)]
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids})
    return rows


@pytest.mark.parametrize("method", ["bayes-adalora", "adalora-ivon"])
def test_ivon_trainer_trains_a_causal_lm_built_with_peft_and_allocates(method, tmp_path):
    steps = 12
    ivon_args = IVONArguments(method=method, init_r=4, target_r=2, tinit=2, tfinal=4, delta_t=1, orth_reg=0.0,
                              ivon_clip_radius=0.1)
    model = tiny_llama_with_adalora(ivon_args, steps, modules_to_save=["lm_head"])  # the head learns fast
    data = counting_sequences(32)
    trainer = IVONTrainer(model=model, args=trainer_args(tmp_path, max_steps=steps, learning_rate=3.0),
                          train_dataset=data, eval_dataset=data[:8], ivon_args=ivon_args,
                          compute_metrics=compute_metrics)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    ranks = adalora_ranks(model)
    assert len(ranks) == 2 * 2 and sum(ranks.values()) == 2 * len(ranks)  # the budget fell to target_r
    assert trainer.ivon_optimizer.current_step == steps
    assert after["eval_loss"] < before["eval_loss"] - 0.05
    # compute_metrics scored the 11 next tokens of each of the 8 sequences: its nll is the model's own loss
    assert after["eval_nll"] == pytest.approx(after["eval_loss"], rel=1e-4)
    # the same evaluation with the logits reduced on the way (4 numbers a token gathered, not the vocabulary)
    trainer.preprocess_logits_for_metrics, trainer.compute_metrics = reduce_lm_logits, compute_lm_metrics
    reduced = trainer.evaluate()
    numbers = [k for k in after if k.startswith("eval_") and not k.endswith(("runtime", "per_second"))]
    assert len(numbers) == 10 and {k: reduced[k] for k in numbers} == pytest.approx({k: after[k] for k in numbers})


@pytest.mark.parametrize("trainer_class", [AdaLoraTrainer, IVONTrainer])
def test_the_orthogonality_penalty_counts_once_a_step_under_gradient_accumulation(trainer_class, tmp_path):
    """A causal LM's token loss is summed over micro-batches undivided (`num_items_in_batch`): peft's penalty,
    added to each forward, counted accumulation-steps times under AdaLoraTrainer (IVONTrainer averages the
    micro-batches, and must not divide). One step on 2 x 2 sequences and on 1 x 4 must agree: plain SGD's
    step (AdamW's first is lr * sign); IVON's momentum, with a Hessian so large that samples are the mean."""
    ivon = trainer_class is IVONTrainer
    ivon_args = IVONArguments(method="adalora-ivon", init_r=4, target_r=2, tinit=2, tfinal=1, delta_t=1,
                              orth_reg=1.0, ivon_hess_init=1e16 if ivon else 1.0)
    data = counting_sequences(8)
    got, start = [], None
    for batch, accumulation in ((4, 1), (2, 2)):
        model = tiny_llama_with_adalora(ivon_args, 4)
        start = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
        args = trainer_args(tmp_path / str(batch), max_steps=4, per_device_train_batch_size=batch,
                            gradient_accumulation_steps=accumulation, learning_rate=0.5 if ivon else 0.05,
                            **({} if ivon else dict(optim="sgd", lr_scheduler_type="constant")))
        extra = dict(ivon_args=ivon_args) if ivon else {}
        trainer = trainer_class(model=model, args=args, train_dataset=data, callbacks=[StopAfter(1)], **extra)
        trainer.train()
        if ivon:
            got.append({"momentum": trainer.ivon_optimizer.param_groups[0]["momentum"].clone()})
        else:
            got.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n})
    for name, whole in got[0].items():
        assert not torch.equal(whole, start.get(name, torch.zeros_like(whole)))  # it stepped
        torch.testing.assert_close(got[1][name], whole, rtol=1e-4, atol=1e-5 * whole.abs().max().item())


def test_a_classifiers_penalty_keeps_its_proportion_and_evaluation_runs_before_training(tiny_deberta, glue_dir,
                                                                                        tmp_path):
    """A DeBERTa classifier's forward takes **kwargs, so the Trainer passes num_items_in_batch and adds its mean
    losses undivided over micro-batches: its cross-entropy and its penalty are counted alike, nothing is
    divided. A causal LM's token loss is divided over the step, so there the penalty is. Evaluation (before
    any training step set the accumulation count: an AttributeError once) divides nothing."""
    tokenizer, _, _ = load_model(str(tiny_deberta), SST2, False)
    dev = read_sst2(glue_dir, "dev", tokenizer, limit=8)
    classifier = build_sst2_trainer("adalora", tiny_deberta, glue_dir, tmp_path / "c", eval_dataset=dev,
                                    args=dict(gradient_accumulation_steps=2))
    assert classifier.model_accepts_loss_kwargs
    assert "eval_loss" in classifier.evaluate()
    assert classifier.penalty_divisor(classifier.model.train(), 16) == 1.0
    ivon_args = IVONArguments(method="adalora-ivon", init_r=4, target_r=2, tinit=2, tfinal=1, delta_t=1)
    lm = AdaLoraTrainer(model=tiny_llama_with_adalora(ivon_args, 4), train_dataset=counting_sequences(8),
                        args=trainer_args(tmp_path / "lm", max_steps=4, gradient_accumulation_steps=2))
    assert lm.penalty_divisor(lm.model.train(), 44) == 2.0 and lm.penalty_divisor(lm.model.eval(), 44) == 1.0


# ----------------------------------------------------------------------------- compute_metrics


def test_compute_metrics_by_hand_for_a_classifier_and_a_causal_lm():
    ln3 = math.log(3)
    logits = np.array([[0.0, ln3], [ln3, 0.0], [0.0, 0.0]])  # confidences .75, .75, .5 (argmax of a tie: 0)
    labels = np.array([1, 1, 0])  # right, wrong, right
    expected = {
        "accuracy": 2 / 3,
        "nll": -(math.log(0.75) + math.log(0.25) + math.log(0.5)) / 3,
        "brier": (2 * 0.25**2 + 2 * 0.75**2 + 2 * 0.5**2) / 3,
        "ece": 2 / 3 * abs(0.5 - 0.75) + 1 / 3 * abs(1 - 0.5),  # bins (11/15, 12/15] and (7/15, 8/15]
        "aurc": (0 + 1 / 2 + 1 / 3) / 3,  # risk among the 1, 2, 3 most confident
        "accuracy_at_coverage_0.5": 1.0,  # the 2 most confident, ties in order: right, wrong -> ceil(1.5) = 2
    }
    expected["accuracy_at_coverage_0.5"] = 0.5
    got = compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    for name, value in expected.items():
        assert got[name] == pytest.approx(value), name
    # a causal LM: logits at t score the label at t + 1; -100 is left out
    lm_logits = np.concatenate([logits, [[5.0, -5.0]]])[None]  # (1, 4, 2); the last position predicts nothing
    lm_labels = np.array([[-100, 1, 1, 0]])
    assert compute_metrics(EvalPrediction(predictions=lm_logits, label_ids=lm_labels)) == pytest.approx(got)


def test_causal_lm_metrics_match_a_float64_reference_over_a_real_vocabulary():
    from scipy.special import log_softmax

    from bayes_adalora.evaluation import Predictive, calibration_metrics

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 6, 11)) * 2
    labels = rng.integers(0, 11, size=(3, 6))
    labels[0, :3] = labels[2, 4:] = -100  # a prompt, padding
    # by hand: position t predicts label t + 1; -100 left out; float64 throughout
    flat, targets = logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1)
    flat, targets = flat[targets != -100], targets[targets != -100]
    predictive = Predictive(flat.argmax(axis=-1), log_softmax(flat, axis=-1))
    expected = calibration_metrics(predictive, targets)
    at = expected.pop("accuracy_at_coverage")
    expected.update(accuracy=float((predictive.predictions == targets).mean()),
                    **{f"accuracy_at_coverage_{c}": v for c, v in at.items()})
    got = compute_metrics(EvalPrediction(logits.astype(np.float32), labels))
    assert got == pytest.approx(expected, rel=1e-5) and len(got) == 8
    reduced = reduce_lm_logits(torch.as_tensor(logits, dtype=torch.float32), torch.as_tensor(labels)).numpy()
    assert compute_lm_metrics(EvalPrediction(reduced, labels)) == pytest.approx(expected, rel=1e-5)
    nothing = np.full_like(labels, -100)
    with pytest.raises(ValueError, match="no scored label"):
        compute_lm_metrics(EvalPrediction(reduced, nothing))
    with pytest.raises(ValueError, match="no scored label"):
        compute_metrics(EvalPrediction(logits, nothing))


def test_reduced_lm_logits_give_compute_metrics_numbers_across_batches_the_trainer_padded():
    from transformers.trainer_pt_utils import nested_concat

    rng = np.random.default_rng(0)
    batches = []
    for length in (5, 3):  # the Trainer pads the shorter batch's predictions and labels with -100
        logits = torch.as_tensor(rng.normal(size=(2, length, 7)) * 3, dtype=torch.float32)
        labels = torch.as_tensor(rng.integers(0, 7, size=(2, length)))
        labels[0, :2] = -100  # a prompt
        batches.append((logits, labels))
    gather = lambda parts: nested_concat(parts[0], parts[1], padding_index=-100)  # noqa: E731
    logits, labels = (gather([b[i] for b in batches]).numpy() for i in (0, 1))
    full = compute_metrics(EvalPrediction(logits, labels))
    reduced = gather([reduce_lm_logits(*b) for b in batches])
    assert reduced.shape == (4, 4, 4)
    got = compute_lm_metrics(EvalPrediction(reduced.numpy(), labels))
    assert got == pytest.approx(full, rel=1e-5) and 0 < got["accuracy"] < 1
    with pytest.raises(ValueError, match=r"reduce_lm_logits' \(N, T - 1, 4\) statistics"):
        compute_lm_metrics(EvalPrediction(logits, labels))


# ----------------------------------------------------------------------------- posterior predictive


def test_posterior_predictive_keeps_pruned_lambdas_at_zero_and_averages_draws(tiny_deberta, glue_dir):
    """Every lambda pruned (0): whatever noise P and Q get, the adapter adds nothing, so the predictive is the
    base model's softmax exactly; with one lambda alive the draws move the prediction."""
    torch.manual_seed(0)  # the new head too
    tokenizer, base, _ = load_model(str(tiny_deberta), SST2, False)
    model = get_peft_model(base, AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["query_proj"]))
    with torch.no_grad():
        model.base_model.model.classifier.weight.mul_(100.0)  # a random tiny head is near-uniform: make it decide
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = ivon.IVON(params, lr=0.1, ess=10.0, hess_init=1e-2)  # sigma = 1: loud noise
    batch = DataCollatorWithPadding(tokenizer)(read_sst2(glue_dir, "dev", tokenizer, limit=8))
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        base_probs = torch.softmax(model(**{k: v for k, v in batch.items() if k != "labels"}).logits, -1)
    probs = posterior_predictive(model, optimizer, batch, samples=4, seed=0)
    assert torch.allclose(probs, base_probs, atol=1e-6)
    lam = next(m for m in model.modules() if isinstance(m, AdaLoraLayer)).lora_E["default"]
    with torch.no_grad():
        lam[0] = 10.0
    first, again = (posterior_predictive(model, optimizer, batch, samples=4, seed=0) for _ in range(2))
    assert torch.equal(first, again)  # seeded draws
    assert (first.log() - base_probs.log()).abs().max() > 1e-3  # against 1e-6 with every lambda pruned
    assert torch.allclose(first.sum(-1), torch.ones(len(first)))
    assert lam[0] == 10.0 and (lam[1:] == 0).all()  # the mean is restored


def guide_block(title: str) -> str:
    text = GUIDE.read_text()
    section = text[text.index(title):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_guides_own_loop_recipe_reallocates_and_predicts():
    namespace = {}
    exec(compile(guide_block("## Your own training loop"), "trainer.md", "exec"), namespace)
    model, probs = namespace["model"], namespace["probs"]
    ranks = adalora_ranks(model)
    assert sum(ranks.values()) == 4 * len(ranks) and set(ranks.values()) != {4}  # reallocated, at the budget
    assert probs.shape == (2, 2) and torch.allclose(probs.sum(-1), torch.ones(2))


# ----------------------------------------------------------------------------- resumable checkpoints


def build_sst2_trainer(method, tiny_deberta, glue_dir, tmp_path, **overrides):
    config = TrainConfig(method=method, init_r=4, target_r=2, tinit=2, tfinal=3, delta_t=1)
    torch.manual_seed(0)  # before the new head is drawn
    tokenizer, base, fresh = load_model(str(tiny_deberta), SST2, False)
    model = build_trainable_model(base, config, 12, fresh)
    train_set = read_sst2(glue_dir, "train", tokenizer)
    settings = dict(max_steps=12, save_strategy="steps", save_steps=5, learning_rate=0.5 if config.uses_ivon else 5e-3)
    args = trainer_args(tmp_path, **{**settings, **overrides.pop("args", {})})
    common = dict(model=model, args=args, train_dataset=train_set, data_collator=DataCollatorWithPadding(tokenizer),
                  **overrides)
    return IVONTrainer(**common, config=config) if config.uses_ivon else AdaLoraTrainer(**common)


def trained_state(trainer) -> dict:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["bayes-adalora", "adalora-ivon", "adalora"])
def test_a_stopped_and_resumed_trainer_run_ends_bitwise_equal(method, tiny_deberta, glue_dir, tmp_path):
    """12 steps over 8-batch epochs of 64 examples; stopped after step 5 (mid-epoch, mid-fall of the budget),
    resumed from checkpoint-5 by a new Trainer on a new model: every weight equal bit for bit."""
    whole = build_sst2_trainer(method, tiny_deberta, glue_dir, tmp_path / "whole")
    whole.train()
    stopped = build_sst2_trainer(method, tiny_deberta, glue_dir, tmp_path / "parts", callbacks=[StopAfter(5)])
    stopped.train()
    checkpoint = tmp_path / "parts" / "trainer" / "checkpoint-5"
    assert (checkpoint / ADALORA_STATE).is_file()
    resumed = build_sst2_trainer(method, tiny_deberta, glue_dir, tmp_path / "parts")
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert resumed.state.global_step == 12
    a, b = trained_state(whole), trained_state(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a), [n for n in a if not torch.equal(a[n], b[n])][:3]
    assert adalora_ranks(whole.model) == adalora_ranks(resumed.model)
    if method != "adalora":
        assert resumed.ivon_optimizer.current_step == 12
        assert torch.equal(whole.ivon_optimizer.param_groups[0]["hess"], resumed.ivon_optimizer.param_groups[0]["hess"])
    # the checkpoint's adapter is untrimmed, and stock peft reads it back
    _, fresh_base, _ = load_model(str(tiny_deberta), SST2, False)
    reloaded = PeftModel.from_pretrained(fresh_base, checkpoint)
    assert {m.lora_E["default"].shape[0] for m in reloaded.modules() if isinstance(m, AdaLoraLayer)} == {4}


@pytest.mark.parametrize("save_only_model", [False, True])  # True: no optimizer state (a ValueError at the end before)
def test_load_best_model_at_end_restores_the_best_checkpoint_and_its_pattern(save_only_model, tiny_deberta, glue_dir,
                                                                            tmp_path):
    evaluations = []

    def metric_best_first(prediction):  # the first evaluation (step 4) is the best one
        evaluations.append(1)
        return {"order": -len(evaluations)}

    tokenizer, _, _ = load_model(str(tiny_deberta), SST2, False)
    dev = read_sst2(glue_dir, "dev", tokenizer, limit=16)
    trainer = build_sst2_trainer(
        "bayes-adalora", tiny_deberta, glue_dir, tmp_path, eval_dataset=dev, compute_metrics=metric_best_first,
        args=dict(save_steps=4, eval_strategy="steps", eval_steps=4, load_best_model_at_end=True,
                  metric_for_best_model="order", greater_is_better=True, save_total_limit=None,
                  save_only_model=save_only_model),
    )
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name == "checkpoint-4"
    pattern = torch.load(best / ADALORA_STATE, weights_only=True)["allocator"]["rank_pattern"]
    assert trainer.model.peft_config["default"].rank_pattern == pattern
    # the model in memory is the checkpoint's, as stock peft reads it back
    _, fresh_base, _ = load_model(str(tiny_deberta), SST2, False)
    reloaded = PeftModel.from_pretrained(fresh_base, best).eval()
    batch = DataCollatorWithPadding(tokenizer)(dev)
    batch.pop("labels")
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(trainer.model(**batch).logits, reloaded(**batch).logits, atol=1e-6)
    ranks = {k.removeprefix("base_model.model."): v for k, v in adalora_ranks(trainer.model).items()}
    assert ranks == {k.removesuffix(".lora_E.default"): sum(v) for k, v in pattern.items()}


# ----------------------------------------------------------------------------- several processes


@pytest.fixture(scope="module")
def tiny_deberta_no_dropout(tmp_path_factory):
    """Dropout draws from each process's RNG on its shard; without it, 2 x 8 examples = 1 x 16."""
    return save_tiny_deberta(tmp_path_factory.mktemp("tiny-deberta-nodrop"), hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0, pooler_dropout=0.0)


def test_ivon_trainer_under_torchrun_masks_alike_and_matches_one_process(tmp_path, glue_dir, tiny_deberta_no_dropout,
                                                                        monkeypatch):
    """2 processes x 8 examples against 1 x 16: the same global batches and IVON noise, sync=True."""
    script = Path(__file__).with_name("ddp_trainer_run.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(script.parent), os.environ.get("PYTHONPATH", "")])}
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    arguments = [str(tiny_deberta_no_dropout), str(glue_dir)]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
              *arguments, str(tmp_path / "two"), "8"]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    monkeypatch.setattr(sys, "argv", [str(script), *arguments, str(tmp_path / "one"), "16"])
    monkeypatch.syspath_prepend(str(script.parent))
    runpy.run_path(str(script), run_name="__main__")  # one process: here, without a second start-up
    runs = {name: json.loads((tmp_path / name / "result.json").read_text()) for name in ("one", "two")}
    one, two = runs["one"], runs["two"]
    assert (one["world"], one["sync"], two["world"], two["sync"]) == (1, False, 2, True)
    assert two["ranks"][0] == two["ranks"][1] == one["ranks"][0]  # every process masked the same triplets
    assert sum(one["ranks"][0].values()) == 2 * len(one["ranks"][0])
    a = {k: torch.tensor(v) for k, v in one["weights"].items()}
    b = {k: torch.tensor(v) for k, v in two["weights"].items()}
    worst = max((a[k] - b[k]).abs().max().item() / (a[k].abs().max().item() + 1e-12) for k in a if a[k].numel())
    assert worst < 1e-3, worst  # only the order of float sums differs
