"""The fast AdaLoRA path against stock peft: loss, gradients, fall-backs, final masks, rank pattern
after a run, and the saved adapter read back by stock peft."""

import copy
import json

import pytest
import torch
from peft import AdaLoraConfig, TaskType, get_peft_model
from peft.tuners.adalora import AdaLoraModel
from peft.tuners.adalora.layer import RankAllocator, SVDLinear
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from bayes_adalora.config import TrainConfig
from bayes_adalora.fast_adalora import FastAdaLoraModel, FastSVDLinear, enable_fast_path
from bayes_adalora.ivon_inplace import InplaceIVON
from bayes_adalora.run_io import evaluate_run, load_run_model, read_run
from bayes_adalora.train import train
from helpers import rounding_bound

# MiniLM: 6 layers, its longest sum the 1536 terms of the feed-forward; a gradient goes through them twice
MINILM_SUM, MINILM_LAYERS = 1536, 6
MINILM_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def stock_and_fast(path, orth_reg=0.3, dropout=0.0, seed=0):
    """Two identical peft AdaLoRA models of `path`; lambda, P and Q random (lambda 0 would hide the
    adapter branch); the second switched to the fast path."""
    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    config = AdaLoraConfig(task_type=TaskType.SEQ_CLS, init_r=6, target_r=4, target_modules=MINILM_TARGETS,
                           lora_alpha=32, lora_dropout=dropout, orth_reg_weight=orth_reg, total_step=100,
                           tinit=10, tfinal=20, deltaT=10)
    stock = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in stock.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5 if "lora_E" in name else 0.1)
    fast = copy.deepcopy(stock)
    enable_fast_path(fast)
    return stock, fast


def batch(path, n=8):
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = ["a fine and moving film", "dull, long and really rather awful", "great", "not good at all"] * (n // 4)
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    encoded["labels"] = torch.tensor([1, 0, 1, 0] * (n // 4))
    return dict(encoded)


def loss_and_grads(model, inputs, seed=5):
    torch.manual_seed(seed)  # the same dropout masks in both models
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("orth_reg", [0.3, 0.0])
def test_loss_and_gradients_equal_stock_peft(minilm_path, orth_reg):
    stock, fast = stock_and_fast(minilm_path, orth_reg=orth_reg)
    assert type(fast.base_model) is FastAdaLoraModel
    assert sum(type(m) is FastSVDLinear for m in fast.modules()) == 36  # 6 layers x 6 matrices
    stock.train(), fast.train()
    inputs = batch(minilm_path)
    loss_stock, grads_stock = loss_and_grads(stock, inputs)
    loss_fast, grads_fast = loss_and_grads(fast, inputs)
    assert abs(loss_stock - loss_fast) <= rounding_bound(torch.tensor(loss_stock), MINILM_SUM, MINILM_LAYERS)
    assert set(grads_stock) == set(grads_fast) and any("lora_E" in n for n in grads_fast)
    all_stock = torch.cat([g.flatten() for g in grads_stock.values()])
    worst = max((grads_stock[n] - grads_fast[n]).abs().max().item() for n in grads_stock)
    assert worst <= rounding_bound(all_stock, MINILM_SUM, 2 * MINILM_LAYERS)
    if orth_reg:  # the penalty is in the loss: without it, the loss changes
        without = copy.deepcopy(fast)
        without.base_model.peft_config["default"].orth_reg_weight = 0.0
        assert abs(loss_and_grads(without, inputs)[0] - loss_fast) > 1e-3


def test_bf16_autocast_is_no_further_from_fp32_than_stock_peft(minilm_path):
    """Under bf16 autocast (in-place ops escape it: P is cast by hand) the loss and lambda's gradients
    are at least as close to the fp32 values as stock peft's under the same autocast."""
    stock, fast = stock_and_fast(minilm_path)
    stock.train(), fast.train()
    inputs = batch(minilm_path)
    loss_fp32, grads_fp32 = loss_and_grads(stock, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_stock, grads_stock = loss_and_grads(stock, inputs)
        loss_fast, grads_fast = loss_and_grads(fast, inputs)
    assert abs(loss_fast - loss_fp32) <= abs(loss_stock - loss_fp32) + 1e-3

    def worst(grads):
        return max(((grads[n] - grads_fp32[n]).norm() / grads_fp32[n].norm()).item() for n in grads if "lora_E" in n)

    assert worst(grads_fast) <= worst(grads_stock) * 1.1
    assert all(g.dtype == torch.float32 for g in grads_fast.values()) and set(grads_fast) == set(grads_stock)


def test_penalty_is_peft_formula_by_hand():
    """mean over matrices of ||Q Q^T - I||_F and ||P^T P - I||_F, computed here matrix by matrix."""
    from bayes_adalora.fast_adalora import orthogonality_penalty

    gen = torch.Generator().manual_seed(0)
    qs = [torch.randn(3, 7, generator=gen), torch.randn(3, 7, generator=gen), torch.randn(3, 5, generator=gen)]
    ps = [torch.randn(9, 3, generator=gen)]
    by_hand = sum(torch.linalg.norm(q @ q.T - torch.eye(3)) for q in qs)
    by_hand = by_hand + torch.linalg.norm(ps[0].T @ ps[0] - torch.eye(3))
    got = orthogonality_penalty([(qs[:2], False), (qs[2:], False), (ps, True)])
    assert torch.allclose(got, by_hand / 4, rtol=1e-6)


def test_merged_disabled_and_dropout_fall_back_to_peft(minilm_path):
    stock, fast = stock_and_fast(minilm_path, orth_reg=0.0, dropout=0.1)  # dropout: peft's own forward, exactly
    stock.train(), fast.train()
    inputs = batch(minilm_path)
    assert loss_and_grads(stock, inputs)[0] == loss_and_grads(fast, inputs)[0]
    stock, fast = stock_and_fast(minilm_path)
    stock.eval(), fast.eval()
    inputs = {k: v for k, v in batch(minilm_path).items() if k != "labels"}
    with stock.disable_adapter(), fast.disable_adapter():  # autograd on: the fused layer would apply
        assert torch.equal(stock(**inputs).logits, fast(**inputs).logits)
    fused = fast(**inputs).logits
    assert (fused - stock(**inputs).logits).abs().max() <= rounding_bound(fused, MINILM_SUM, MINILM_LAYERS)
    with torch.no_grad():
        for layer in (m for m in fast.modules() if isinstance(m, FastSVDLinear)):
            layer.merge()
    merged = fast(**inputs).logits  # the base layer alone, its weight holding the adapter's update
    assert (merged - fused).abs().max() <= rounding_bound(fused, MINILM_SUM, MINILM_LAYERS)


def test_final_masks_equal_peft_mask_using_rank_pattern(minilm_path):
    stock, fast = stock_and_fast(minilm_path)
    config = stock.peft_config["default"]
    gen = torch.Generator().manual_seed(3)
    pattern = {n: (torch.rand(6, generator=gen) > 0.4).tolist() for n, _ in stock.base_model.model.named_parameters()
               if "lora_E" in n}
    config.rank_pattern = fast.peft_config["default"].rank_pattern = pattern
    step = config.total_step - config.tfinal + 1  # a step of the final phase
    stock.base_model.update_and_allocate(step)
    fast.base_model.update_and_allocate(step)
    lambdas = {n: p for n, p in fast.named_parameters() if "lora_E" in n}
    for n, p in stock.named_parameters():
        if "lora_E" in n:
            assert torch.equal(p, lambdas[n])
    assert sum(int((p != 0).sum()) for p in lambdas.values()) == sum(sum(v) for v in pattern.values())
    # peft's keys without the adapter name are read too; a new pattern replaces the cached masks
    truncated = {n.replace(".default", ""): [True] * 6 for n in pattern}
    truncated[next(iter(truncated))] = [False] * 6
    fast.peft_config["default"].rank_pattern = truncated
    fast.base_model.update_and_allocate(step + 1)
    assert int((next(iter(lambdas.values())) != 0).sum()) == 0


TINY = dict(task="sst2", max_steps=100, max_length=32, batch_size=8, eval_steps=100, warmup_steps=5, tinit=10,
            tfinal=30, delta_t=5, init_r=4, target_r=2, plots=False, progress=False, seed=0)


@pytest.mark.parametrize("method", ["adalora", "bayes-adalora"])
def test_same_rank_pattern_as_stock_after_100_steps_and_stock_peft_reads_the_adapter(
        method, tmp_path, glue_dir, tiny_deberta):
    runs = {}
    for fast in (False, True):
        config = TrainConfig(**TINY, method=method, model=str(tiny_deberta), data_dir=str(glue_dir), fast_path=fast,
                             output_dir=str(tmp_path / f"fast-{fast}"))
        runs[fast] = train(config)
    assert runs[True]["final_ranks"] == runs[False]["final_ranks"]
    assert runs[True]["total_rank"] == 2 * len(runs[True]["final_ranks"])
    assert abs(runs[True]["metrics"]["final"]["accuracy"] - runs[False]["metrics"]["final"]["accuracy"]) <= 1 / 32

    # the fast run's adapter, read back by stock peft (the `evaluate` command's loader), predicts as the
    # model that trained it: results.json's metrics, computed in training by the fast model, come back
    run = tmp_path / "fast-True"
    pattern = json.loads((run / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern and all(len(v) == 4 for v in pattern.values())
    again = evaluate_run(run, device="cpu")["metrics"]["point"]
    final = runs[True]["metrics"]["final"]
    assert all(abs(again[k] - final[k]) <= 1e-6 for k in ("accuracy", "nll", "brier"))
    _, stock = load_run_model(read_run(run), torch.device("cpu"))
    assert type(stock.base_model) is AdaLoraModel and any(type(m) is SVDLinear for m in stock.modules())
    assert any((p != 0).any() for n, p in stock.named_parameters() if "lora_E" in n)
    fast = copy.deepcopy(stock)
    enable_fast_path(fast)
    inputs = {"input_ids": torch.randint(5, 1000, (4, 16), generator=torch.Generator().manual_seed(0))}
    logits = stock(**inputs).logits
    # autograd on: the fused layer; the tiny DeBERTa: 2 layers, its longest sum 64 terms
    assert (logits - fast(**inputs).logits).abs().max() <= rounding_bound(logits, 64, 2)
    with torch.no_grad():  # evaluation: peft's own forward, the same numbers
        assert torch.equal(stock(**inputs).logits, fast(**inputs).logits)


def test_enable_fast_path_adopts_ivon_and_leaves_others(minilm_path):
    import ivon

    stock, fast = stock_and_fast(minilm_path)
    optimizer = ivon.IVON([p for p in fast.parameters() if p.requires_grad], lr=0.1, ess=100.0)
    assert enable_fast_path(fast, optimizer) is optimizer and type(optimizer) is InplaceIVON
    adamw = torch.optim.AdamW([p for p in stock.parameters() if p.requires_grad])
    assert type(enable_fast_path(stock, adamw)) is torch.optim.AdamW
    assert isinstance(fast.base_model.rankallocator, RankAllocator)


def test_foreach_sensitivity_is_bitwise_peft_update_ipt(minilm_path):
    stock, fast = stock_and_fast(minilm_path, orth_reg=0.0)
    stock.train(), fast.train()
    inputs = batch(minilm_path)
    for step in (1, 2, 3):  # gradients made equal, so that only the EMAs' arithmetic is compared
        _, grads = loss_and_grads(stock, inputs, seed=step)
        for n, p in fast.named_parameters():
            if n in grads:
                p.grad = grads[n].clone()
        stock.base_model.update_and_allocate(step)
        fast.base_model.update_and_allocate(step)
    allocator = fast.base_model.rankallocator
    assert type(allocator).__name__ == "ForeachRankAllocator" and isinstance(allocator, RankAllocator)
    reference = stock.base_model.rankallocator
    for field in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        ours, theirs = getattr(allocator, field), getattr(reference, field)
        assert set(ours) == set(theirs) and len(ours) == 108
        assert all(torch.equal(ours[n], theirs[n]) for n in theirs)
    assert any(bool((allocator.exp_avg_unc[n] > 0).any()) for n in allocator.exp_avg_unc)
