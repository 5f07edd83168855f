"""TRL's SFTTrainer with our rank allocation (AdamW) and with IVON, on a tiny causal LM built with peft."""

import pytest
import torch

from bayes_adalora import IVONArguments, IVONTrainer, RankAllocationCallback
from test_hf_trainer import adalora_ranks
from test_trainer_parity import counting_sequences, tiny_llama_with_adalora

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


class IVONSFTTrainer(IVONTrainer, trl.SFTTrainer):
    """TRL's supervised fine-tuning (its data handling and loss) with IVON's sampled step and allocation."""


def sft_config(tmp_path, steps, lr):
    return trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=steps, learning_rate=lr, report_to=[],
                         use_cpu=True, per_device_train_batch_size=8, logging_strategy="no", save_strategy="no",
                         max_grad_norm=0.0, seed=0, disable_tqdm=True, packing=False)


def training_set():
    rows = counting_sequences(32)
    return datasets.Dataset.from_list([{"input_ids": r["input_ids"]} for r in rows])


@pytest.mark.parametrize("optimizer", ["adamw", "ivon"])
def test_sft_trainer_with_our_allocation_trains_a_tiny_causal_lm(optimizer, tmp_path, minilm_path):
    from transformers import AutoTokenizer

    steps = 10
    ivon_args = IVONArguments(method="bayes-adalora" if optimizer == "ivon" else "adalora", init_r=4, target_r=2,
                              tinit=2, tfinal=3, delta_t=1, orth_reg=0.0, ivon_clip_radius=0.1)
    model = tiny_llama_with_adalora(ivon_args, steps, modules_to_save=["lm_head"])  # the head learns fast
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)  # ids below 128 only: the tiny model's vocabulary
    data = training_set()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.tensor(data["input_ids"])

    def loss():
        model.eval()
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss.item()

    start = loss()
    if optimizer == "ivon":
        trainer = IVONSFTTrainer(model=model, args=sft_config(tmp_path, steps, 3.0), train_dataset=data,
                                 processing_class=tokenizer, ivon_args=ivon_args)
    else:
        trainer = trl.SFTTrainer(model=model, args=sft_config(tmp_path, steps, 5e-3), train_dataset=data,
                                 processing_class=tokenizer, callbacks=[RankAllocationCallback()])
    trainer.train()
    assert trainer.state.global_step == steps
    assert model.peft_config["default"].total_step == steps
    ranks = adalora_ranks(model)
    assert len(ranks) == 4 and sum(ranks.values()) == 2 * len(ranks)  # the budget fell to target_r
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_E" in n for n in moved)
    assert loss() < start - 0.05  # it learned: next-token loss on the training sequences fell
    if optimizer == "ivon":
        assert trainer.ivon_optimizer.current_step == steps

