"""Decoder LMs end to end: `--task causal-lm` and `--task multiple-choice` on tiny random Llama, Qwen2 and
GPT-2 models (built by examples/tiny_lm.py, offline) and its synthetic colour data.

Every metric is checked against a computation written here from the model's logits with stock
transformers and peft (the saved adapter reloaded by `PeftModel.from_pretrained`), not with the
package's own scoring code.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from bayes_adalora.cli import main
from helpers import rounding_bound

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import tiny_lm  # examples/tiny_lm.py: the README's offline model and data

MODULES_PER_LAYER = 7  # q k v o gate up down: the llama/qwen2 preset
LAYERS = 2


@pytest.fixture(scope="session")
def lm_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lm-data")
    tiny_lm.write_data(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lms(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-lms")
    return {kind: tiny_lm.save_tiny_lm(root / kind, kind) for kind in ("llama", "qwen2", "gpt2")}


def train_args(model: Path, data: Path, out: Path, task: str, *extra: str, steps: int = 40) -> list[str]:
    files = "causal-lm" if task == "causal-lm" else "multiple-choice"
    return ["train", "--task", task, "--model", str(model), "--train-file", str(data / f"{files}-train.jsonl"),
            "--validation-file", str(data / f"{files}-dev.jsonl"), "--max-steps", str(steps), "--batch-size", "16",
            "--output-dir", str(out), "--no-progress", "--no-plots", *extra]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def stock_model(base: Path, run: Path | None):
    """The base model, with the run's adapter through stock peft when `run` is given, in eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return (PeftModel.from_pretrained(model, run / "adapter") if run else model).eval()


def completion_nll_by_hand(model, base: Path, examples: list[dict], eos: bool) -> list[torch.Tensor]:
    """Per example, -log p of each completion token (and EOS), one example at a time, no padding."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    out = []
    with torch.no_grad():
        for ex in examples:
            prompt = tok(ex["prompt"])["input_ids"]
            joint = tok(ex["prompt"] + ex["completion"])["input_ids"]
            # the completion's tokens are the joint text's after the prompt's, where the prompt's are a prefix
            completion = (joint[len(prompt):] if joint[:len(prompt)] == prompt
                          else tok(ex["completion"], add_special_tokens=False)["input_ids"])
            completion = completion + ([tok.eos_token_id] if eos else [])
            ids = torch.tensor([prompt + completion])
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            positions = range(len(prompt) - 1, len(prompt) + len(completion) - 1)
            out.append(torch.stack([-log_probs[t, ids[0, t + 1]] for t in positions]))
    return out


def test_causal_lm_run_on_llama_reloads_in_stock_peft_and_lowers_the_nll(tiny_lms, lm_data, tmp_path, capsys):
    """The issue's must-show: 40 steps of bayes-adalora; results.json's NLL and perplexity equal those of
    the adapter reloaded by stock peft, computed by hand; below the untrained model's; evaluate gives
    them back exactly; posterior.safetensors holds a sigma for every trained weight; `export --merge` gives a
    plain causal LM with the run's logits."""
    base, out = tiny_lms["llama"], tmp_path / "run"
    assert main(train_args(base, lm_data, out, "causal-lm", "--mc-samples", "4", "--learning-rate", "30")) == 0
    results = json.loads((out / "results.json").read_text())
    final = results["metrics"]["final"]
    dev = rows(lm_data / "causal-lm-dev.jsonl")

    before = torch.cat(completion_nll_by_hand(stock_model(base, None), base, dev, eos=True))
    after = torch.cat(completion_nll_by_hand(stock_model(base, out), base, dev, eos=True))
    assert final["tokens"] == len(after) == 2 * len(dev)  # " red" and EOS
    assert final["nll"] == pytest.approx(float(after.mean()), rel=1e-5)
    assert final["perplexity"] == pytest.approx(math.exp(float(after.mean())), rel=1e-5)
    assert final["nll"] < float(before.mean()) - 0.05  # the adapter learned (the untrained model is near log |V|)
    assert float(before.mean()) == pytest.approx(math.log(len(tiny_lm.VOCAB)), abs=0.1)

    mc = results["metrics"]["mc"]
    assert mc["samples"] == 4 and mc["tokens"] == final["tokens"] and math.isfinite(mc["nll"])
    assert mc["nll"] != final["nll"]  # the draws moved the weights
    with safe_open(str(out / "posterior.safetensors"), framework="pt") as f:
        sigmas = {k for k in f.keys() if k.endswith(".sigma")}  # noqa: SIM118 (a safetensors file)
    assert len(sigmas) == 3 * LAYERS * MODULES_PER_LAYER  # P, lambda and Q of every adapted matrix

    capsys.readouterr()
    predictions = tmp_path / "predictions.csv"
    assert main(["evaluate", str(out), "--mc-samples", "4", "--predictions", str(predictions)]) == 0
    evaluated = json.loads(capsys.readouterr().out)["metrics"]
    assert evaluated["point"] == final and evaluated["mc"] == mc
    with open(predictions) as f:
        per_example = list(csv.DictReader(f))
    assert len(per_example) == len(dev)
    pooled = sum(int(r["tokens"]) * float(r["nll"]) for r in per_example) / final["tokens"]
    assert pooled == pytest.approx(mc["nll"], rel=1e-9)  # the rows are the posterior predictive's

    # export --merge: a plain transformers causal LM, with the run's logits, and a card that says how to load it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = tmp_path / "merged"
    assert main(["export", str(out), "--merge", "--output-dir", str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    ids = AutoTokenizer.from_pretrained(merged_dir)([dev[0]["prompt"] + dev[0]["completion"]], return_tensors="pt")
    with torch.no_grad():
        diff = (merged(**ids).logits - stock_model(base, out)(**ids).logits).abs().max()
    assert float(diff) < 1e-5
    assert "AutoModelForCausalLM.from_pretrained" in (merged_dir / "README.md").read_text()


def test_adalora_meets_its_rank_budget_on_qwen2_and_the_logits_match_stock_peft(tiny_lms, lm_data, tmp_path):
    base, out = tiny_lms["qwen2"], tmp_path / "run"
    assert main(train_args(base, lm_data, out, "causal-lm", "--method", "adalora", "--learning-rate", "0.02",
                           "--target-r", "2", steps=12)) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["final_ranks"]) == LAYERS * MODULES_PER_LAYER
    assert sum(results["final_ranks"].values()) == 2 * LAYERS * MODULES_PER_LAYER  # target_r per matrix
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    assert sum(config["rank_pattern"][k].count(True) for k in config["rank_pattern"]) == 2 * LAYERS * MODULES_PER_LAYER

    from bayes_adalora.run_folder import read_run
    from bayes_adalora.run_io import load_run_model

    _, ours = load_run_model(read_run(out), torch.device("cpu"))
    ids = torch.tensor([[1, 3, 4, 5, 6, 7, 24, 8, 9, 10, 14]])
    with torch.no_grad():  # ours keeps pruned triplets as zeros at the initial rank, stock peft trims them
        torch.testing.assert_close(ours(input_ids=ids).logits, stock_model(base, out)(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-6)


def choice_metrics_by_hand(model, base: Path, questions: list[dict]) -> dict:
    """Accuracy, NLL and Brier of the softmax over each choice's summed log-likelihood given the question."""
    probabilities, answers = [], []
    for q in questions:
        examples = [{"prompt": f"{q['question']}\nAnswer:", "completion": f" {c}"} for c in q["choices"]]
        scores = torch.stack([-t.sum() for t in completion_nll_by_hand(model, base, examples, eos=False)])
        probabilities.append(torch.softmax(scores, 0).numpy())
        answers.append(q["answer"] if isinstance(q["answer"], int) else q["choices"].index(q["answer"]))
    p, y = np.array(probabilities), np.array(answers)
    return {"accuracy": float((p.argmax(1) == y).mean()), "nll": float(-np.log(p[np.arange(len(y)), y]).mean()),
            "brier": float(((p - np.eye(p.shape[1])[y]) ** 2).sum(1).mean())}


def test_multiple_choice_beats_chance_and_its_metrics_match_scoring_by_hand(tiny_lms, lm_data, tmp_path):
    base, out = tiny_lms["llama"], tmp_path / "run"
    assert main(train_args(base, lm_data, out, "multiple-choice", "--method", "adalora", "--learning-rate", "0.02",
                           steps=100)) == 0
    final = json.loads((out / "results.json").read_text())["metrics"]["final"]
    by_hand = choice_metrics_by_hand(stock_model(base, out), base, rows(lm_data / "multiple-choice-dev.jsonl"))
    assert final["accuracy"] == by_hand["accuracy"] >= 0.6  # chance: 1/3 (P(>= 15 of 24) < 0.002)
    assert final["nll"] == pytest.approx(by_hand["nll"], rel=1e-5)
    assert final["brier"] == pytest.approx(by_hand["brier"], rel=1e-5)
    assert {"ece", "aurc"} <= set(final)


def test_multiple_choice_posterior_predictive_and_evaluate(tiny_lms, lm_data, tmp_path, capsys):
    base, out = tiny_lms["llama"], tmp_path / "run"
    assert main(train_args(base, lm_data, out, "multiple-choice", "--mc-samples", "4", steps=8)) == 0
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert {"accuracy", "ece", "nll", "brier", "aurc"} <= set(metrics["mc"]) and metrics["mc"]["samples"] == 4
    capsys.readouterr()
    predictions = tmp_path / "p.csv"
    assert main(["evaluate", str(out), "--mc-samples", "4", "--predictions", str(predictions)]) == 0
    evaluated = json.loads(capsys.readouterr().out)["metrics"]
    assert evaluated["point"] == metrics["final"] and evaluated["mc"] == metrics["mc"]
    with open(predictions) as f:
        table = list(csv.DictReader(f))
    assert [r["choice"] for r in table] == [tiny_lm.COLORS[int(r["prediction"])] for r in table]
    correct = [int(r["prediction"]) == tiny_lm.COLORS.index(tiny_lm.color_of(w))
               for r, w in zip(table, tiny_lm.WORDS)]
    assert np.mean(correct) == metrics["mc"]["accuracy"]

    assert main(["evaluate", str(out), "--data-file", str(lm_data / "multiple-choice-train.jsonl"),
                 "--max-eval-samples", "10"]) == 0
    other = json.loads(capsys.readouterr().out)
    assert other["examples"] == {"dev": 10} and other["data"]["dev"].endswith("multiple-choice-train.jsonl")
    assert main(["evaluate", str(out), "--data-dir", str(lm_data)]) == 2  # a GLUE folder: one sentence
    assert "reads no GLUE folder" in capsys.readouterr().err

    from bayes_adalora.plots import plot_run

    drawn = {Path(p).name for p in plot_run(out)}
    assert {"ranks.png", "training.png", "sigma.png"} <= drawn


@pytest.mark.parametrize("method", ["full", "lora", "adalora-ivon", "bayes-adalora"])
def test_every_method_trains_gpt2_and_evaluate_gives_back_its_metrics(method, tiny_lms, lm_data, tmp_path, capsys):
    """GPT-2's Conv1D projections take the adapter (fan_in_fan_out); the run reloads as trained (adalora:
    on Qwen2 above)."""
    base, out2 = tiny_lms["gpt2"], tmp_path / method
    assert main(train_args(base, lm_data, out2, "causal-lm", "--method", method, steps=4)) == 0
    final = json.loads((out2 / "results.json").read_text())["metrics"]["final"]
    capsys.readouterr()
    assert main(["evaluate", str(out2)]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["point"] == final
    if method != "full":
        dev = rows(lm_data / "causal-lm-dev.jsonl")
        by_hand = torch.cat(completion_nll_by_hand(stock_model(base, out2), base, dev, eos=True))
        assert final["nll"] == pytest.approx(float(by_hand.mean()), rel=1e-5)


def test_resumed_causal_lm_run_equals_the_uninterrupted_one(tiny_lms, lm_data, tmp_path):
    base = tiny_lms["llama"]
    reference, saved, resumed = tmp_path / "reference", tmp_path / "saved", tmp_path / "resumed"
    assert main(train_args(base, lm_data, reference, "causal-lm", steps=16)) == 0  # 192 examples: 12 batches/epoch
    assert main(train_args(base, lm_data, saved, "causal-lm", "--save-steps", "7", "--save-total-limit", "0",
                           steps=16)) == 0
    assert main(train_args(base, lm_data, resumed, "causal-lm", "--resume-from-checkpoint",
                           str(saved / "checkpoints" / "checkpoint-14"), steps=16)) == 0
    for name in ("adapter/adapter_model.safetensors", "posterior.safetensors"):
        a, b = load_file(reference / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    for name in ("results.json", "history.json"):
        a, b = (json.loads((f / name).read_text()) for f in (reference, resumed))
        assert a["metrics"] == b["metrics"] if name == "results.json" else a["loss"] == b["loss"]


def bad(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("task, content, message", [
    ("multiple-choice", '{"question": "q", "choices": ["a", "b"]}\n', "there is no column 'answer'"),
    ("multiple-choice", '{"question": "q", "choices": ["a", "b"], "answer": "c"}\n', "is not among the 2 choices"),
    ("multiple-choice", '{"question": "q", "choices": ["a", "b"], "answer": 2}\n', "is not among the 2 choices"),
    ("causal-lm", "", "the file is empty"),
    ("causal-lm", '{"prompt": "p", "answer": "a"}\n', "needs a 'text' column, or 'prompt' and 'completion'"),
])
def test_bad_lm_data_is_refused_in_one_sentence(task, content, message, tiny_lms, tmp_path, capsys):
    path = bad(tmp_path, "data.jsonl", content)
    out = tmp_path / "out"
    args = ["train", "--task", task, "--model", str(tiny_lms["llama"]), "--train-file", str(path),
            "--validation-file", str(path), "--output-dir", str(out), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_a_quantized_base_is_refused_off_cuda(tiny_lms, lm_data, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(train_args(tiny_lms["llama"], lm_data, out, "causal-lm", "--load-in", "8bit", "--device", "cpu"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "needs a CUDA device" in err[0], err
    assert not (out / "results.json").exists()


def test_the_trainer_integration_tunes_a_causal_lm(tiny_lms, lm_data, tmp_path):
    """make_trainer loads a causal LM for --task causal-lm and pads with the completion collator; IVON
    trains it and the saved adapter is a CAUSAL_LM adapter that stock peft reads back."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from bayes_adalora import TrainConfig
    from bayes_adalora.hf_trainer import IVONTrainer, make_trainer
    from bayes_adalora.lm_data import encode_completions, read_completion_file

    base = tiny_lms["llama"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    train_set = encode_completions(read_completion_file(lm_data / "causal-lm-train.jsonl"), tokenizer, 32, eos=True)
    args = TrainingArguments(output_dir=str(tmp_path / "t"), report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", per_device_train_batch_size=16, learning_rate=30.0,
                             max_grad_norm=0.0, max_steps=6, disable_tqdm=True)
    trainer = make_trainer(str(base), train_set, None, TrainConfig(task="causal-lm"), args)
    assert isinstance(trainer, IVONTrainer)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["task_type"] == "CAUSAL_LM" and saved["peft_type"] == "ADALORA"
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter").eval()
    ids = torch.tensor([train_set[0]["input_ids"]])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-6)


def test_trainer_gradient_accumulation_weighs_a_causal_lms_tokens_as_one_batch(tiny_lms, tmp_path):
    """One IVONTrainer step over 8 text rows of 1 to 11 sentences as 2 micro-batches of 4 (their token counts differ:
    35 sentences in all): IVON's momentum, (1 - beta1) * its averaged gradient, must equal (1 - beta1) * the gradient
    of the per-token mean loss over all 8 rows (and the orthogonality penalty once) by one plain backward. (Each
    micro-batch's own token mean, averaged, weighs the shorter micro-batch's tokens more.) A huge initial Hessian
    makes the posterior samples the mean weights."""
    import copy

    from torch import nn
    from transformers import AutoTokenizer, TrainingArguments

    from bayes_adalora import TrainConfig
    from bayes_adalora.hf_trainer import make_trainer
    from bayes_adalora.lm_data import encode_completions, read_completion_file

    base = tiny_lms["llama"]
    texts = [" ".join([f"the color of {w} is {tiny_lm.color_of(w)} ."] * n)
             for w, n in zip(tiny_lm.WORDS, (1, 9, 2, 1, 6, 1, 11, 4))]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizer = AutoTokenizer.from_pretrained(base)
    train_set = encode_completions(read_completion_file(tmp_path / "train.jsonl"), tokenizer, 128, eos=True)
    config = TrainConfig(task="causal-lm", method="bayes-adalora", init_r=4, target_r=2, tinit=0, tfinal=0,
                         delta_t=1, ivon_hess_init=1e16)
    args = TrainingArguments(output_dir=str(tmp_path / "t"), report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             learning_rate=0.5, max_grad_norm=0.0, max_steps=1, seed=0, disable_tqdm=True)
    trainer = make_trainer(str(base), train_set, None, config, args)
    for module in trainer.model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    reference = copy.deepcopy(trainer.model)
    trainer.train()

    reference.train()
    batch = trainer.data_collator([train_set[i] for i in range(len(train_set))])  # the run's PadCompletions
    reference(**batch).loss.backward()
    full_batch_grad = torch.cat([p.grad.reshape(-1) for p in reference.parameters() if p.requires_grad])
    momentum = trainer.ivon_optimizer.param_groups[0]["momentum"]
    expected = (1 - config.ivon_beta1) * full_batch_grad
    assert torch.allclose(momentum, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_completions_are_cut_from_the_prompt_start_and_label_the_completion_only():
    from bayes_adalora.lm_data import CompletionDataset, encode_completions, fit_to_length

    assert fit_to_length([1, 2, 3], [7, 8], 5) == ([1, 2, 3], [7, 8])
    assert fit_to_length([1, 2, 3], [7, 8], 4) == ([2, 3], [7, 8])  # the prompt's start goes first
    assert fit_to_length([1, 2, 3], [7, 8, 9, 10], 3) == ([3], [7, 8])  # one token of context is kept
    assert fit_to_length([], [7, 8, 9], 2) == ([], [7, 8])
    tokenizer = tiny_lm.build_tokenizer()
    ids = {w: i for i, w in enumerate(tiny_lm.VOCAB)}
    data = CompletionDataset(["what is w3", ""], [" red", "the color ."], "test")
    first, text = encode_completions(data, tokenizer, 32, eos=True)
    assert first["input_ids"] == [ids["<s>"], ids["what"], ids["is"], ids["w3"], ids["red"], ids["</s>"]]
    assert first["labels"] == [-100] * 4 + [ids["red"], ids["</s>"]]
    assert text["labels"] == [-100, ids["the"], ids["color"], ids["."], ids["</s>"]]  # <s> is the prompt


def word_tokenizer(words: list[str], bos: bool, legacy: bool = False):
    """A word-level tokenizer over <unk> <s> </s> and `words`: with `bos` it starts every text with <s>
    (Llama), without it adds nothing (GPT-2, Qwen2; then it has no BOS token either). `legacy`: SentencePiece
    "legacy" style (Llama-2, Mistral v0.1): every space becomes '▁', one more '▁' starts the text, and the
    text splits before each '▁', so `" red"` alone is ['▁', '▁red'] but "Answer: red" ends in '▁red'."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = ["<unk>", "<s>", "</s>", *words]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    else:
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>" if bos else None, eos_token="</s>",
                                   unk_token="<unk>"), {w: i for i, w in enumerate(vocab)}


def test_a_cut_prompt_keeps_its_bos_token_first_and_the_completion_whole():
    from bayes_adalora.lm_data import CompletionDataset, encode_completions, fit_to_length

    assert fit_to_length([1, 2, 3, 4], [7, 8], 4, head=1) == ([1, 4], [7, 8])  # <s>, then the prompt's end
    assert fit_to_length([1, 2, 3], [7, 8, 9, 10], 3, head=1) == ([1, 3], [7])  # <s> and one token of context
    assert fit_to_length([1], [7, 8, 9], 2, head=1) == ([1], [7])  # a text row: <s> is its context
    tokenizer = tiny_lm.build_tokenizer()
    ids = {w: i for i, w in enumerate(tiny_lm.VOCAB)}
    data = CompletionDataset(["what is the color of w1 ?\nAnswer:"], [" red"], "test")
    [cut] = encode_completions(data, tokenizer, 5, eos=True)
    assert cut["input_ids"] == [ids["<s>"], ids["Answer"], ids[":"], ids["red"], ids["</s>"]]
    assert cut["labels"] == [-100, -100, -100, ids["red"], ids["</s>"]]


def test_a_text_row_is_scored_from_its_first_token_when_the_tokenizer_adds_no_bos():
    """Without a BOS token, the EOS token is the text's context: "red" and EOS are both predicted (the
    labels are shifted by one, so a first token with nothing before it would never be)."""
    from bayes_adalora.lm_data import CompletionDataset, encode_completions
    from bayes_adalora.lm_metrics import completion_log_probs

    tokenizer, ids = word_tokenizer(["red", "green"], bos=False)
    assert tokenizer("red")["input_ids"] == [ids["red"]] and tokenizer.bos_token_id is None
    [row] = encode_completions(CompletionDataset([""], ["red"], "test"), tokenizer, 32, eos=True)
    assert row["input_ids"] == [ids["</s>"], ids["red"], ids["</s>"]]
    assert row["labels"] == [-100, ids["red"], ids["</s>"]]
    logits = torch.randn(1, 3, len(ids), generator=torch.Generator().manual_seed(0))
    [scored] = completion_log_probs(logits, torch.tensor([row["labels"]]))
    by_hand = torch.log_softmax(logits[0].double(), -1)
    assert len(scored) == 2  # "red" (after EOS) and the closing EOS (after "red")
    torch.testing.assert_close(scored.double(), torch.stack([by_hand[0, ids["red"]], by_hand[1, ids["</s>"]]]),
                               rtol=1e-6, atol=1e-6)
    bos_tokenizer, bos_ids = word_tokenizer(["red"], bos=True)  # with a BOS token, BOS is the context
    [row] = encode_completions(CompletionDataset([""], ["red"], "test"), bos_tokenizer, 32, eos=True)
    assert row["input_ids"] == [bos_ids["<s>"], bos_ids["red"], bos_ids["</s>"]]


def test_a_completion_is_tokenized_as_it_reads_after_its_prompt():
    """A legacy SentencePiece-style tokenizer gives " red" alone a stray '▁' token; the labelled
    completion is the joint text's tail ['▁red'], in training (the right answer) and in scoring alike."""
    from bayes_adalora.lm_data import ChoiceDataset, CompletionDataset, encode_completions

    words = ["▁", "▁what", "▁is", "▁w3", "▁Answer:", "▁red", "▁blue", "▁w3\nAnswer:"]  # "\n" is no split
    tokenizer, ids = word_tokenizer(words, bos=True, legacy=True)
    assert tokenizer(" red", add_special_tokens=False)["input_ids"] == [ids["▁"], ids["▁red"]]  # apart: 2 tokens
    question = [ids["<s>"], ids["▁what"], ids["▁is"], ids["▁w3"], ids["▁Answer:"]]
    data = CompletionDataset(["what is w3 Answer:", "what is w3 Answer: "], [" red", "red"], "test")
    joint, apart = encode_completions(data, tokenizer, 32, eos=True)
    assert joint["input_ids"] == [*question, ids["▁red"], ids["</s>"]]
    assert joint["labels"] == [-100] * 5 + [ids["▁red"], ids["</s>"]]
    # "...Answer: " + "red": the prompt's trailing space moves to the completion, which then reads '▁red' as
    # after "Answer:" (encoded apart, it was a stray '▁' and '▁red')
    assert apart == joint

    choices = ChoiceDataset(["what is w3"], [["blue", "red"]], [1], "test")
    [trained] = encode_completions(choices.answer_sequences(), tokenizer, 32, eos=False)
    scored = encode_completions(choices.choice_sequences(), tokenizer, 32, eos=False)
    assert trained == scored[1]
    assert trained["input_ids"] == [ids["<s>"], ids["▁what"], ids["▁is"], ids["▁w3\nAnswer:"], ids["▁red"]]
    assert trained["labels"] == [-100] * 4 + [ids["▁red"]] and scored[0]["labels"] == [-100] * 4 + [ids["▁blue"]]


def test_a_digit_string_answer_is_an_index_unless_a_choice_has_that_text(tmp_path):
    from bayes_adalora.errors import UserError
    from bayes_adalora.lm_data import answer_index, read_choice_file

    assert answer_index("3", ["a", "b", "c", "d"], "x") == 3  # HellaSwag's "label": "3"
    assert answer_index("3", ["1", "2", "3"], "x") == 2  # the choice's text wins
    assert answer_index(1, ["a", "b"], "x") == 1 and answer_index("b", ["a", "b"], "x") == 1
    with pytest.raises(UserError, match="is not among the 2 choices"):
        answer_index("2", ["a", "b"], "x")
    path = bad(tmp_path, "mc.jsonl", '{"question": "q", "choices": ["a", "b", "c"], "answer": "2"}\n')
    assert read_choice_file(path).answers == [2]


def test_posterior_predictive_token_probability_by_hand():
    from bayes_adalora.lm_metrics import mc_token_log_probs, token_nll_metrics

    p = np.array([[0.5, 0.1], [0.25, 0.3]])  # two draws, two tokens
    assert np.allclose(mc_token_log_probs(np.log(p)), np.log([0.375, 0.2]))
    got = token_nll_metrics(np.log([0.375, 0.2]))
    assert got["nll"] == pytest.approx(-(math.log(0.375) + math.log(0.2)) / 2) and got["tokens"] == 2
    assert got["perplexity"] == pytest.approx(1 / math.sqrt(0.375 * 0.2))


# adapted matrices per layer, from each architecture's code: GPT-2 has two `c_proj` (attention and MLP),
# Phi-3 fuses q/k/v and gate/up, GPT-NeoX fuses q/k/v and names its attention output `dense`
PER_LAYER = {"llama": 7, "mistral": 7, "qwen2": 7, "qwen3": 7, "gemma": 7, "gemma2": 7, "phi3": 4, "gpt2": 4,
             "gpt_neox": 4, "opt": 6}


@pytest.mark.parametrize("model_type", sorted(PER_LAYER))
def test_every_decoder_preset_adapts_each_layers_projections(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    from bayes_adalora.models import TARGET_MODULE_PRESETS, plan_adapter_modules

    shape = {
        "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
        "opt": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
                    max_position_embeddings=64),
    }.get(model_type, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=64, max_position_embeddings=64, head_dim=8))
    config = AutoConfig.for_model(model_type, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, **shape)
    model = AutoModelForCausalLM.from_config(config)
    targets, trained_in_full = plan_adapter_modules(model, TARGET_MODULE_PRESETS[model_type], set())
    assert len(targets) == LAYERS * PER_LAYER[model_type] and trained_in_full == []
    assert not any("lm_head" in t or "embed" in t for t in targets)


def test_the_pad_token_falls_back_to_eos_and_pads_on_the_right(tiny_lms):
    from bayes_adalora.lm_data import PadCompletions
    from bayes_adalora.models import load_causal_lm

    tokenizer, model, fresh = load_causal_lm(str(tiny_lms["llama"]), False, torch.device("cpu"))
    assert tiny_lm.build_tokenizer().pad_token is None  # the saved tokenizer has none
    assert tokenizer.pad_token == "</s>" and tokenizer.pad_token_id == model.config.pad_token_id == 2
    assert fresh == set()
    batch = PadCompletions(tokenizer.pad_token_id)([{"input_ids": [1, 5], "labels": [-100, 5]},
                                                    {"input_ids": [1], "labels": [-100]}])
    assert batch["input_ids"].tolist() == [[1, 5], [1, 2]] and batch["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert batch["labels"].tolist() == [[-100, 5], [-100, -100]]


@pytest.mark.parametrize("fsdp", [[], ["--fsdp", "full_shard"]], ids=["ddp", "fsdp"])
def test_two_processes_tune_a_decoder_lm_as_one_does(fsdp, tiny_lms, tmp_path):
    """torchrun with 2 CPU processes (gloo), causal-lm `text` rows of very unequal lengths, so the two halves of a
    batch hold unequal numbers of scored tokens: the same global batches, so the same ranks and, up to the order of
    float sums, the same adapter and metrics as one process (worst 7e-5 relative). Each process averaging its own
    tokens, and DDP averaging those means, would weigh the shorter half's tokens more: the adapters then differ by
    2.0 relative (tried). lr 3, not 30: at 30 IVON amplifies the float-sum order to 1.1e-3 in 6 steps. IVON's clip
    is off: it is a step function, and an update on its edge flips with the last bit of a sum, which moved the
    adapter by 1.6e-2 relative under AVX-512 kernels (7e-5 under AVX2); without it 2.9e-5 under AVX-512."""
    import os
    import subprocess

    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 16), ("dev", 8)):
        words = [tiny_lm.WORDS[(3 * i + len(split)) % len(tiny_lm.WORDS)] for i in range(n)]
        # 1 to 11 sentences a row: 7 to 77 scored tokens (and EOS)
        texts = [" ".join([f"the color of {w} is {tiny_lm.color_of(w)} ."] * (1, 9, 2, 1, 6, 1, 11, 3)[i % 8])
                 for i, w in enumerate(words)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    counts = sorted({row["text"].count(".") for row in rows(data / "train.jsonl")})
    assert counts == [1, 2, 3, 6, 9, 11], counts

    def args(out: Path) -> list[str]:
        return ["train", "--task", "causal-lm", "--model", str(tiny_lms["llama"]), "--train-file",
                str(data / "train.jsonl"), "--validation-file", str(data / "dev.jsonl"), "--max-steps", "6",
                "--batch-size", "16", "--max-length", "128", "--learning-rate", "3", "--ivon-clip-radius", "1e9",
                "--output-dir", str(out), "--no-progress", "--no-plots"]

    single, double = tmp_path / "single", tmp_path / "double"
    assert main(args(single)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "bayes_adalora.cli", *args(double), *fsdp]  # under FSDP: the second process builds on meta
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((r / "results.json").read_text()) for r in (single, double))
    assert (one["processes"], two["processes"]) == (1, 2) and one["final_ranks"] == two["final_ranks"]
    a, b = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (single, double))
    worst = max((a[k] - b[k]).abs().max().item() / (a[k].abs().max().item() + 1e-12) for k in a if a[k].numel())
    # float-sum order alone: sums of up to 16 x 128 tokens, through 2 layers forward and back, over 6 steps
    assert worst < rounding_bound(torch.ones(()), 16 * 128, 6 * 2 * 2), worst
    assert two["metrics"]["final"]["nll"] == pytest.approx(one["metrics"]["final"]["nll"], rel=1e-5)
    # the logged loss is the global batch's per-token mean too
    hist = [json.loads((r / "history.json").read_text())["loss"] for r in (single, double)]
    assert hist[1] == pytest.approx(hist[0], rel=1e-4)


def test_completions_cut_at_max_length_are_counted_in_a_warning(capsys):
    from bayes_adalora.lm_data import CompletionDataset, encode_completions

    tokenizer, ids = word_tokenizer(["red", "green"], bos=True)
    data = CompletionDataset(["", "red"], ["red green red green", "green"], "train.jsonl")
    long_row, short_row = encode_completions(data, tokenizer, 4, eos=True)
    assert long_row["input_ids"] == [ids["<s>"], ids["red"], ids["green"], ids["red"]]  # its end and EOS are gone
    assert short_row["input_ids"] == [ids["<s>"], ids["red"], ids["green"], ids["</s>"]]  # whole
    err = capsys.readouterr().err.strip()
    assert err == ("bayes-adalora: warning: 1 of 2 sequences of train.jsonl have a completion longer than "
                   "--max-length 4 tokens and lose its end (and the EOS token) in training and scoring; "
                   "--max-length 6 would keep them whole")
    encode_completions(data, tokenizer, 6, eos=True)
    assert capsys.readouterr().err == ""


def test_several_processes_refuse_a_causal_lm_whose_loss_does_not_weigh_tokens():
    """Under several processes each one's loss is its token NLL / the global count (num_items_in_batch): a
    remote-code model computing its loss otherwise would fail on that argument or weigh processes wrongly."""
    from torch import nn
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from bayes_adalora.errors import UserError
    from bayes_adalora.kinds import task_kind
    from bayes_adalora.models import causal_lm_token_loss
    from bayes_adalora.tasks import get_task

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    for task in ("causal-lm", "multiple-choice"):
        task_kind(get_task(task)).check_processes(model, 2)  # transformers' causal-LM loss
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, bos_token_id=0, eos_token_id=0))
    assert gpt2.loss_type is None  # its class name is not in the loss mapping; its loss falls back to ForCausalLM
    assert causal_lm_token_loss(gpt2) and not causal_lm_token_loss(nn.Linear(2, 2))
    task_kind(get_task("causal-lm")).check_processes(gpt2, 2)
    model.loss_type = "MyRemoteLoss"
    task_kind(get_task("causal-lm")).check_processes(model, 1)  # one process needs no weighing
    with pytest.raises(UserError, match=r"^--task causal-lm on 2 processes needs a model whose loss is transformers' "
                                        r"causal-LM loss.*\(this one's loss type is 'MyRemoteLoss'\): train it in one"):
        task_kind(get_task("causal-lm")).check_processes(model, 2)
    task_kind(get_task("sst2")).check_processes(model, 2)  # a classifier's mean loss: any model
