"""A stock `transformers.Trainer` training bayes-adalora, adalora-ivon and adalora (hf_trainer)."""

import copy
import csv

import ivon
import pytest
import torch
from peft import PeftModel
from peft.tuners.adalora import AdaLoraLayer, AdaLoraModel
from safetensors.torch import load_file
from torch import nn
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

from bayes_adalora.allocator import PosteriorRankAllocator
from bayes_adalora.build import build_trainable_model
from bayes_adalora.config import TrainConfig
from bayes_adalora.fast_adalora import FastAdaLoraModel
from bayes_adalora.hf_trainer import (
    AdaLoraTrainer,
    IVONTrainer,
    RankAllocationCallback,
    make_trainer,
    trainer_max_steps,
)
from bayes_adalora.ivon_inplace import InplaceIVON
from bayes_adalora.models import load_model
from bayes_adalora.tasks import get_task

# The tiny DeBERTa of conftest has 2 layers, each with 6 adapted matrices: query_proj, key_proj,
# value_proj, attention.output.dense, intermediate.dense, output.dense (the pooler is trained in full).
ADAPTED_MATRICES = 2 * 6
SST2 = get_task("sst2")


def read_sst2(glue_dir, split, tokenizer, limit=None):
    with open(glue_dir / "SST-2" / f"{split}.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))[:limit]
    tokens = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=32)
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": int(r["label"])}
        for ids, mask, r in zip(tokens["input_ids"], tokens["attention_mask"], rows)
    ]


def trainer_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "trainer"), report_to=[], use_cpu=True, save_strategy="no",
        logging_strategy="no", per_device_train_batch_size=8, learning_rate=0.5, max_grad_norm=0.0,
        lr_scheduler_type="linear", warmup_steps=0, seed=0, disable_tqdm=True,
    )
    return TrainingArguments(**{**settings, **overrides})


def adalora_ranks(model) -> dict[str, int]:
    return {
        name: int((m.lora_E["default"] != 0).sum()) for name, m in model.named_modules() if isinstance(m, AdaLoraLayer)
    }


def adalora_shapes(model) -> dict[str, int]:
    return {name: m.lora_E["default"].shape[0] for name, m in model.named_modules() if isinstance(m, AdaLoraLayer)}


def reload_and_compare(model, adapter_dir, model_path, glue_dir, tokenizer):
    """The adapter in `adapter_dir` on a fresh base model: asserts it predicts as `model` does (eval mode)."""
    _, fresh_base, _ = load_model(str(model_path), SST2, False)
    reloaded = PeftModel.from_pretrained(fresh_base, adapter_dir)
    batch = DataCollatorWithPadding(tokenizer)(read_sst2(glue_dir, "dev", tokenizer, limit=16))
    batch.pop("labels")
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, reloaded(**batch).logits, atol=1e-5)
    return reloaded


class StopAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("method", ["bayes-adalora", "adalora-ivon"])
def test_ivon_trainer_steps_ivon_allocates_every_step_and_saves_the_final_pattern(
    method, tiny_deberta, glue_dir, tmp_path, monkeypatch
):
    steps, samples = 20, 2
    config = TrainConfig(method=method, init_r=4, target_r=2, tinit=3, tfinal=5, delta_t=2, train_mc_samples=samples)
    tokenizer, base, fresh = load_model(str(tiny_deberta), SST2, False)
    torch.manual_seed(0)
    model = build_trainable_model(base, config, 1000, fresh)  # a wrong total_step: the Trainer's must win

    allocations, grads_at_allocation, sampled = [], [], []
    allocate = AdaLoraModel.update_and_allocate
    allocate_fast = FastAdaLoraModel.update_and_allocate  # the default fast path's tuner (calls peft's before tfinal)

    def spy_allocate(self, global_step, original=allocate):
        if type(self) is FastAdaLoraModel and original is allocate:
            return original(self, global_step)  # counted by the fast tuner's own spy
        allocations.append(global_step)
        grads_at_allocation.append(
            all(p.grad is not None for n, p in self.named_parameters() if "lora_" in n and p.requires_grad)
        )
        return original(self, global_step)

    def spy_restore(original):  # the end of each posterior sample: `train` collects its gradient
        def restore(self, train, param_avg, noise):
            sampled.append(train)
            return original(self, train, param_avg, noise)
        return restore

    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", spy_allocate)
    monkeypatch.setattr(FastAdaLoraModel, "update_and_allocate",
                        lambda self, step: spy_allocate(self, step, original=allocate_fast))
    for optimizer_class in (ivon.IVON, InplaceIVON):  # stock, and the fast path's (its own method)
        monkeypatch.setattr(optimizer_class, "_restore_param_average",
                            spy_restore(optimizer_class._restore_param_average))

    train_set = read_sst2(glue_dir, "train", tokenizer)
    with pytest.warns(UserWarning, match="gradient clipping"):
        trainer = IVONTrainer(
            model=model, args=trainer_args(tmp_path, max_steps=steps, max_grad_norm=1.0), train_dataset=train_set,
            data_collator=DataCollatorWithPadding(tokenizer), config=config,
        )
    assert trainer.args.max_grad_norm == 0
    trainer.train()
    optimizer = trainer.ivon_optimizer
    tuner = model.base_model

    # total_step is the Trainer's max_steps
    assert trainer.state.max_steps == steps
    assert tuner.peft_config["default"].total_step == steps
    # one allocation after every optimizer step, steps 1..N, with the gradients still there
    assert allocations == list(range(1, steps + 1))
    assert all(grads_at_allocation)
    # IVON stepped N times, each on `samples` sampled training passes
    assert sampled == [True] * (steps * samples)
    assert optimizer.current_step == steps
    group = optimizer.param_groups[0]
    assert not torch.allclose(group["hess"], torch.full_like(group["hess"], config.ivon_hess_init))
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert group["ess"] == max(len(train_set), 10 * trainable)  # ivon_ess auto, as the CLI's
    assert group["lr"] == pytest.approx(0.0)  # the Trainer's linear schedule ends at 0: it drives IVON's lr
    assert isinstance(tuner.rankallocator, PosteriorRankAllocator) == (method == "bayes-adalora")

    # the budget fell to target_r per adapted matrix
    ranks = adalora_ranks(model)
    assert len(ranks) == ADAPTED_MATRICES
    assert sum(ranks.values()) == config.target_r * ADAPTED_MATRICES

    # the saved adapter holds the final pattern, and reloads to the same predictions
    trainer.save_model(str(tmp_path / "adapter"))
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    saved_ranks = {k.removesuffix(".lora_E"): v.shape[0] for k, v in saved.items() if k.endswith(".lora_E")}
    assert saved_ranks == ranks
    reloaded = reload_and_compare(model, tmp_path / "adapter", tiny_deberta, glue_dir, tokenizer)
    assert adalora_shapes(reloaded) == ranks


def test_gradient_accumulation_hands_ivon_the_batch_mean_gradient(tiny_deberta, glue_dir, tmp_path):
    """One step over 8 examples as 2 micro-batches of 4: IVON's momentum, (1 - beta1) * its averaged
    gradient, must equal (1 - beta1) * the gradient of the mean loss over all 8 by one plain backward.
    A huge initial Hessian makes the posterior samples the mean weights (sigma ~ 1e-7)."""
    config = TrainConfig(
        method="bayes-adalora", init_r=4, target_r=2, tinit=0, tfinal=0, delta_t=1, ivon_hess_init=1e16
    )
    tokenizer, base, fresh = load_model(str(tiny_deberta), SST2, False)
    for module in base.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    torch.manual_seed(0)
    model = build_trainable_model(base, config, 1, fresh)
    reference = copy.deepcopy(model)
    train_set = read_sst2(glue_dir, "train", tokenizer, limit=8)
    trainer = IVONTrainer(
        model=model,
        args=trainer_args(tmp_path, max_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=2),
        train_dataset=train_set,
        data_collator=DataCollatorWithPadding(tokenizer),
        config=config,
    )
    trainer.train()

    reference.train()
    reference(**DataCollatorWithPadding(tokenizer)(train_set)).loss.backward()
    full_batch_grad = torch.cat([p.grad.reshape(-1) for p in reference.parameters() if p.requires_grad])
    momentum = trainer.ivon_optimizer.param_groups[0]["momentum"]
    expected = (1 - config.ivon_beta1) * full_batch_grad
    assert torch.allclose(momentum, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_training_stopped_between_masks_saves_what_the_model_holds(tiny_deberta, glue_dir, tmp_path):
    """Stopped at step 9, one step after the mask of step 8: the masked lambdas have moved off 0 since,
    so the model must be re-masked to step 8's pattern, to which the saved adapter is trimmed."""
    config = TrainConfig(method="bayes-adalora", init_r=4, target_r=2, tinit=3, tfinal=5, delta_t=2)
    tokenizer, _, _ = load_model(str(tiny_deberta), SST2, False)
    train_set = read_sst2(glue_dir, "train", tokenizer)
    trainer = make_trainer(str(tiny_deberta), train_set, None, config, trainer_args(tmp_path, max_steps=20),
                           callbacks=[StopAfter(9)])
    trainer.train()
    assert trainer.state.global_step == 9
    pattern = trainer.model.peft_config["default"].rank_pattern
    kept = sum(sum(flags) for flags in pattern.values())
    assert config.target_r * ADAPTED_MATRICES < kept < config.init_r * ADAPTED_MATRICES  # mid-fall
    in_memory = adalora_ranks(trainer.model.base_model.model)
    assert in_memory == {name: sum(pattern[f"{name}.lora_E.default"]) for name in in_memory}
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = reload_and_compare(trainer.model, tmp_path / "adapter", tiny_deberta, glue_dir, tokenizer)
    assert sum(adalora_shapes(reloaded).values()) == kept


def test_make_trainer_drives_adalora_with_adamw_over_epochs(tiny_deberta, glue_dir, tmp_path):
    """Plain AdaLoRA under a stock Trainer: the callback alone sets total_step and allocates."""
    config = TrainConfig(method="adalora", init_r=4, target_r=2, tinit=1, tfinal=2, delta_t=1)
    tokenizer, _, _ = load_model(str(tiny_deberta), SST2, False)
    train_set = read_sst2(glue_dir, "train", tokenizer)  # 64 examples, batches of 16: 4 steps per epoch
    args = trainer_args(tmp_path, per_device_train_batch_size=16, num_train_epochs=2.5, learning_rate=5e-3)
    trainer = make_trainer(str(tiny_deberta), train_set, None, config, args)
    assert type(trainer) is AdaLoraTrainer and isinstance(trainer, Trainer)
    assert any(isinstance(cb, RankAllocationCallback) for cb in trainer.callback_handler.callbacks)
    assert trainer.model.peft_config["default"].total_step == 10  # ceil(2.5 * 4), estimated before training
    trainer.train()
    assert trainer.state.max_steps == 10
    assert trainer.model.peft_config["default"].total_step == 10
    assert sum(adalora_ranks(trainer.model).values()) == config.target_r * ADAPTED_MATRICES


def test_make_trainer_gives_ivon_methods_an_ivon_trainer(tiny_deberta, glue_dir, tmp_path):
    tokenizer, _, _ = load_model(str(tiny_deberta), SST2, False)
    train_set = read_sst2(glue_dir, "train", tokenizer, limit=16)
    config = TrainConfig(method="bayes-adalora", criterion="snr", tinit=0, tfinal=0)
    trainer = make_trainer(str(tiny_deberta), train_set, None, config, trainer_args(tmp_path, max_steps=3))
    assert isinstance(trainer, IVONTrainer)
    trainer.create_optimizer()
    assert trainer.ivon_optimizer.param_groups[0]["lr"] == 0.5  # TrainingArguments' lr, not config's default 3.0
    assert trainer.model.base_model.rankallocator.criterion == "snr"


@pytest.mark.parametrize(
    "overrides, n_examples, expected",
    [
        (dict(max_steps=7), 1000, 7),
        (
            dict(per_device_train_batch_size=8, num_train_epochs=1.5, gradient_accumulation_steps=2),
            65,
            8,
        ),  # 9 batches, 5 steps/epoch
        (
            dict(
                per_device_train_batch_size=8,
                num_train_epochs=1.5,
                gradient_accumulation_steps=2,
                dataloader_drop_last=True,
            ),
            65,
            6,
        ),  # 8 batches, 4 steps/epoch
        (dict(per_device_train_batch_size=8, num_train_epochs=3), 5, 3),  # one batch per epoch
    ],
)
def test_trainer_max_steps_by_hand(tmp_path, overrides, n_examples, expected):
    assert trainer_max_steps(trainer_args(tmp_path, **overrides), n_examples) == expected


def test_callback_refuses_phases_longer_than_the_run(tiny_deberta, glue_dir, tmp_path):
    config = TrainConfig(method="adalora", init_r=4, target_r=2, tinit=3, tfinal=2, delta_t=1)
    tokenizer, _, _ = load_model(str(tiny_deberta), SST2, False)
    train_set = read_sst2(glue_dir, "train", tokenizer, limit=16)
    trainer = make_trainer(str(tiny_deberta), train_set, None, config, trainer_args(tmp_path, max_steps=10))
    trainer.args.max_steps = 4
    with pytest.raises(ValueError, match=r"tinit \(3\) and tfinal \(2\) leave no steps .* 4 steps"):
        trainer.train()


def test_callback_refuses_load_best_model_at_end_under_a_stock_trainer(tiny_deberta, glue_dir, tmp_path, monkeypatch):
    """A stock Trainer saves trimmed checkpoints, which cannot load back: refused before training."""
    config = TrainConfig(method="adalora", init_r=4, target_r=2, tinit=1, tfinal=1, delta_t=1)
    tokenizer, base, fresh = load_model(str(tiny_deberta), SST2, False)
    train_set = read_sst2(glue_dir, "train", tokenizer, limit=16)
    args = trainer_args(
        tmp_path, max_steps=4, eval_strategy="steps", save_strategy="steps", load_best_model_at_end=True
    )
    trainer = Trainer(model=build_trainable_model(base, config, 4, fresh), args=args, train_dataset=train_set,
                      eval_dataset=train_set, data_collator=DataCollatorWithPadding(tokenizer),
                      callbacks=[RankAllocationCallback()])
    monkeypatch.setattr(Trainer, "training_step", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(ValueError, match="load_best_model_at_end cannot work with AdaLoRA under a stock Trainer"):
        trainer.train()


def test_ivon_trainer_refuses_an_adamw_method(tiny_deberta, tmp_path):
    config = TrainConfig(method="adalora", tinit=0, tfinal=0)
    _, base, fresh = load_model(str(tiny_deberta), SST2, False)
    model = build_trainable_model(base, config, 10, fresh)
    with pytest.raises(ValueError, match="not 'adalora'"):
        IVONTrainer(model=model, args=trainer_args(tmp_path, max_steps=10), config=config)


def test_ivon_trainer_warns_of_an_adamw_scale_learning_rate(tiny_deberta, tmp_path):
    config = TrainConfig(method="bayes-adalora", tinit=0, tfinal=0)
    _, base, fresh = load_model(str(tiny_deberta), SST2, False)
    model = build_trainable_model(base, config, 10, fresh)
    with pytest.warns(UserWarning, match="on AdamW's scale"):
        IVONTrainer(model=model, args=trainer_args(tmp_path, max_steps=10, learning_rate=5e-5), config=config)


def test_ivon_trainer_leaves_the_callers_arguments_and_syncs_an_ivon_passed_in(tiny_deberta, tmp_path, monkeypatch):
    config = TrainConfig(method="bayes-adalora", tinit=0, tfinal=0)
    _, base, fresh = load_model(str(tiny_deberta), SST2, False)
    model = build_trainable_model(base, config, 10, fresh)
    args = trainer_args(tmp_path, max_steps=10, max_grad_norm=1.0)
    mine = ivon.IVON([p for p in model.parameters() if p.requires_grad], lr=1.0, ess=100)
    with pytest.warns(UserWarning, match="max_grad_norm 1.0 set to 0"):
        trainer = IVONTrainer(model=model, args=args, config=config, optimizers=(mine, None))
    assert (args.max_grad_norm, trainer.args.max_grad_norm) == (1.0, 0.0)  # an AdamW baseline on args still clips
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))  # as under torchrun
    trainer.create_optimizer()
    assert trainer.ivon_optimizer is mine and mine.sync  # else accumulated micro-batches stayed per process


@pytest.mark.parametrize("fast", [False, True])  # peft's RankAllocator, and the fast path's ForeachSensitivity
def test_a_step_the_fp16_scaler_skipped_leaves_the_sensitivity_as_it_was_and_still_masks(fast, tiny_deberta,
                                                                                        tmp_path):
    """A skipped step's gradients are inf: read, they made the EMAs inf and NaN for good (never pruned)."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    config = TrainConfig(method="adalora", init_r=4, target_r=2, tinit=1, tfinal=2, delta_t=1, fast_path=fast)
    _, base, fresh = load_model(str(tiny_deberta), SST2, False)
    model = build_trainable_model(base, config, 10, fresh)
    callback, args, control = RankAllocationCallback(), trainer_args(tmp_path), TrainerControl()
    state = TrainerState(max_steps=10, global_step=0)
    callback.on_train_begin(args, state, control, model=model)
    trained = [p for p in model.parameters() if p.requires_grad]
    for p in trained:
        p.grad = torch.randn_like(p)
    callback.on_optimizer_step(args, state, control, model=model, optimizer=SimpleNamespace(step_was_skipped=False))
    allocator = model.base_model.rankallocator
    before = copy.deepcopy((allocator.exp_avg_ipt, allocator.exp_avg_unc))
    for p in trained:
        p.grad = torch.full_like(p, torch.inf)
    state.global_step = 1
    callback.on_optimizer_step(args, state, control, model=model, optimizer=SimpleNamespace(step_was_skipped=True))
    assert all(torch.equal(a, b) for a, b in zip(before[0].values(), allocator.exp_avg_ipt.values()))
    assert all(torch.equal(a, b) for a, b in zip(before[1].values(), allocator.exp_avg_unc.values()))
    assert model.peft_config["default"].rank_pattern  # step 2 masked on schedule
    assert "update_ipt" not in vars(allocator)  # the class's method is back for the next step


def test_a_skipped_first_step_masks_nothing_rather_than_failing(tiny_deberta, tmp_path):
    """Skipped before any step was read: peft's masking has no EMAs to score from (a KeyError)."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    config = TrainConfig(method="adalora", init_r=4, target_r=2, tinit=0, tfinal=2, delta_t=1)
    _, base, fresh = load_model(str(tiny_deberta), SST2, False)
    model = build_trainable_model(base, config, 10, fresh)
    callback, args, control = RankAllocationCallback(), trainer_args(tmp_path), TrainerControl()
    state = TrainerState(max_steps=10, global_step=0)
    callback.on_train_begin(args, state, control, model=model)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, torch.inf)
    callback.on_optimizer_step(args, state, control, model=model, optimizer=SimpleNamespace(step_was_skipped=True))
    assert not model.base_model.rankallocator.exp_avg_ipt and not model.peft_config["default"].rank_pattern
