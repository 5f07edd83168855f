"""The `bayes-adalora train` command end to end on a tiny random DeBERTa-v2 and tiny GLUE folders.

Every number is checked against something the package did not compute: peft's own reload of the
saved adapter, the adapter applied to the base weights by hand (W + B (A*E) alpha / ranknum, or
W + B A alpha / r for LoRA), IVON's sigma formula applied to the saved Hessian, scikit-learn and
SciPy metrics of predictions made here, and parameter counts worked out from the base model.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from scipy import stats
from sklearn.metrics import accuracy_score

import helpers
from bayes_adalora.cli import main
from bayes_adalora.config import bounds_of, config_fields
from helpers import read_json, refused

METHODS = ("full", "lora", "adalora", "adalora-ivon", "bayes-adalora")
ADAPTER_METHODS = ("lora", "adalora", "adalora-ivon", "bayes-adalora")
ADALORA_METHODS = ("adalora", "adalora-ivon", "bayes-adalora")
IVON_METHODS = ("adalora-ivon", "bayes-adalora")
CRITERIA = ("snr_abs", "snr", "mean_abs", "inv_sigma", "e_abs")

STEPS, MAX_LENGTH = 12, 32
INIT_R, TARGET_R, LORA_R, ALPHA = 6, 4, 4, 32.0  # the CLI's defaults, typed from its --help
N_TRAIN = 64  # rows that conftest.write_glue_task puts in each train.tsv
DEBERTA_TARGETS = ("query_proj", "key_proj", "value_proj", "dense")  # shared/recipes/paper-glue.md
FRESH_MODULES = ("pooler.dense", "classifier")  # not in the backbone checkpoint: trained in full

RESULT_KEYS = {
    "task", "method", "criterion", "model", "seed", "steps", "metrics", "train_seconds", "seconds_per_step",
    "peak_memory_mb", "trainable_parameters", "final_ranks", "total_rank",
}


def train_argv(data_dir: Path, model: Path, out: Path, *extra: str, task: str = "sst2") -> list[str]:
    # figures are tested in test_plots.py; drawing them for every run here would add ~20 s
    return helpers.train_argv(data_dir, model, out, *extra, task=task, max_steps=STEPS, max_length=MAX_LENGTH)


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118 (a safetensors file)


def folder_snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder`: its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, glue_dir, tiny_deberta):
    """`trained(method, *flags, task=...)`: the output folder of that run, trained once per module."""
    root = tmp_path_factory.mktemp("runs")
    cache: dict = {}

    def get(method: str, *extra: str, task: str = "sst2") -> Path:
        key = (method, task, extra)
        if key not in cache:
            out = root / f"{task}-{method}-{len(cache)}"
            assert main(train_argv(glue_dir, tiny_deberta, out, "--method", method, *extra, task=task)) == 0
            cache[key] = out
        return cache[key]

    return get


# ----------------------------------------------------------------------------- independent references


def adapted_linear_shapes(model_path: Path) -> dict[str, tuple[int, int]]:
    """(in, out) of every Linear the paper's DeBERTa targets name, outside the freshly created head."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    return {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in DEBERTA_TARGETS
        and not any(name == f or name.startswith(f + ".") for f in FRESH_MODULES)
    }


def head_parameter_count(model_path: Path, num_labels: int) -> int:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)
    modules = dict(model.named_modules())
    return sum(p.numel() for f in FRESH_MODULES for p in modules[f].parameters())


def dev_examples(data_dir: Path, task: str) -> tuple[list[tuple[str, ...]], list]:
    """Texts and labels of the tiny dev file, read here with csv (GLUE files: no quoting)."""
    folder, text_cols, label_col = {
        "sst2": ("SST-2", ("sentence",), "label"),
        "stsb": ("STS-B", ("sentence1", "sentence2"), "score"),
    }[task]
    with open(data_dir / folder / "dev.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    texts = [tuple(r[c] for c in text_cols) for r in rows]
    labels = [float(r[label_col]) if task == "stsb" else int(r[label_col]) for r in rows]
    return texts, labels


def logits_of(model, model_path: Path, texts: list[tuple[str, ...]]) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    batch = tokenizer(*map(list, zip(*texts)), truncation=True, max_length=MAX_LENGTH, padding=True,
                      return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


def peft_reloaded_logits(model_path: Path, adapter: Path, num_labels: int, texts) -> torch.Tensor:
    """What a user gets with plain transformers + peft from the saved adapter folder."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)
    return logits_of(PeftModel.from_pretrained(base, adapter), model_path, texts)


def hand_merged_model(model_path: Path, num_labels: int, factors: dict[str, dict[str, torch.Tensor]],
                       head: dict[str, torch.Tensor], scale_of) -> torch.Tensor:
    """The base model with each adapted weight replaced by W + B diag(E) A * scale (LoRA: E = 1),
    and the head's weights set from `head`; no peft involved.

    `factors[module] = {"A": (r, in), "B": (out, r), "E": (r, 1) or absent}`, `scale_of(module, r)`.
    """
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, f in factors.items():
            a = f["A"] * f["E"] if "E" in f else f["A"]
            modules[name].weight += (f["B"].double() @ a.double() * scale_of(name, f["A"].shape[0])).float()
        for name, value in head.items():
            params[name].copy_(value)
    return model


def split_factors(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(low-rank factors per module, head weights) from tensors named as in the PeftModel."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    head = {}
    for key, value in tensors.items():
        name = key.removeprefix("base_model.model.")
        parts = name.split(".")
        for factor in ("lora_A", "lora_B", "lora_E"):
            if factor in parts:
                module = ".".join(parts[: parts.index(factor)])
                factors.setdefault(module, {})[factor[-1]] = value
                break
        else:
            head[name.replace(".modules_to_save.default", "")] = value
    return factors, head


def adapter_factors(adapter_file: Path) -> tuple[dict, dict]:
    """(low-rank factors per module, head weights) from peft's adapter_model.safetensors."""
    return split_factors(read_tensors(adapter_file)[0])


def posterior_means(posterior_file: Path) -> tuple[dict, dict]:
    """(low-rank factors per module, head weights) from the posterior means the run held at the end."""
    tensors, _ = read_tensors(posterior_file)
    return split_factors({k.removesuffix(".mean"): v for k, v in tensors.items() if k.endswith(".mean")})


# ----------------------------------------------------------------------------- every method trains and saves


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_writes_its_run(method, trained, tiny_deberta):
    run = trained(method)
    results = read_json(run / "results.json")
    assert set(results) >= RESULT_KEYS
    assert results["task"] == "sst2" and results["method"] == method and results["seed"] == 0
    assert results["model"] == str(tiny_deberta)
    assert results["steps"] == STEPS
    assert results["criterion"] == ("snr_abs" if method == "bayes-adalora" else None)

    final, best = results["metrics"]["final"], results["metrics"]["best"]
    assert set(final) == {"accuracy", "ece", "nll", "brier", "aurc", "accuracy_at_coverage"}
    # accuracy on 32 dev rows is a multiple of 1/32
    assert final["accuracy"] * 32 == pytest.approx(round(final["accuracy"] * 32), abs=1e-9)
    assert 1 <= best["step"] <= STEPS and best["accuracy"] >= final["accuracy"]
    assert results["train_seconds"] > 0 and results["peak_memory_mb"] > 0

    config = read_json(run / "config.json")
    assert config["method"] == method and config["task"] == "sst2" and config["seed"] == 0

    shapes = adapted_linear_shapes(tiny_deberta)
    head = head_parameter_count(tiny_deberta, 2)
    if method == "full":
        from transformers import AutoModelForSequenceClassification

        whole = AutoModelForSequenceClassification.from_pretrained(tiny_deberta, num_labels=2)
        assert results["trainable_parameters"] == sum(p.numel() for p in whole.parameters())
        assert results["final_ranks"] == {} and results["total_rank"] == 0
        assert not (run / "adapter").exists()
    else:
        assert set(results["final_ranks"]) == set(shapes)
        assert results["total_rank"] == sum(results["final_ranks"].values())
        assert (run / "adapter" / "adapter_config.json").is_file()
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
        factors, _ = adapter_factors(run / "adapter" / "adapter_model.safetensors")
        # the saved adapter holds exactly the ranks the run reports
        assert {m: f["A"].shape[0] for m, f in factors.items()} == results["final_ranks"]
    if method == "lora":
        assert set(results["final_ranks"].values()) == {LORA_R}
        assert results["trainable_parameters"] == head + sum(LORA_R * (i + o) for i, o in shapes.values())
    if method in ADALORA_METHODS:
        # A (r x in), B (out x r) and E (r x 1) per matrix at the initial rank
        assert results["trainable_parameters"] == head + sum(INIT_R * (i + o + 1) for i, o in shapes.values())
        assert all(0 <= r <= INIT_R for r in results["final_ranks"].values())
        assert results["total_rank"] == TARGET_R * len(results["final_ranks"])
    assert (run / "posterior.safetensors").is_file() == (method in IVON_METHODS)


@pytest.mark.parametrize("method", IVON_METHODS)
def test_posterior_file_holds_ivon_sigma(method, trained):
    tensors, meta = read_tensors(trained(method) / "posterior.safetensors")
    ess, weight_decay = float(meta["ess"]), float(meta["weight_decay"])
    trainable = read_json(trained(method) / "results.json")["trainable_parameters"]
    assert ess == max(N_TRAIN, 10 * trainable)  # default ess (auto): 10 per trainable parameter, or the examples
    assert weight_decay == 1e-8  # default IVON weight decay (paper-glue.md)
    names = {k.removesuffix(".hess") for k in tensors if k.endswith(".hess")}
    assert names and {k.rsplit(".", 1)[0] for k in tensors} == names
    assert any("lora_E" in n for n in names) and any("classifier" in n for n in names)
    for name in names:
        hess = tensors[f"{name}.hess"].double()
        expected = 1.0 / torch.sqrt(ess * (hess + weight_decay))
        torch.testing.assert_close(tensors[f"{name}.sigma"].double(), expected, rtol=1e-6, atol=0)
        assert tensors[f"{name}.mean"].shape == hess.shape


@pytest.mark.parametrize("criterion", CRITERIA[1:])  # snr_abs, the default, ran above
def test_every_posterior_criterion_trains(criterion, trained):
    run = trained("bayes-adalora", "--criterion", criterion)
    results = read_json(run / "results.json")
    assert results["criterion"] == criterion
    assert results["total_rank"] == TARGET_R * len(results["final_ranks"])
    # the saved adapter holds the ranks the run reports, whatever the criterion chose
    factors, _ = adapter_factors(run / "adapter" / "adapter_model.safetensors")
    assert {m: f["A"].shape[0] for m, f in factors.items()} == results["final_ranks"]


def test_final_budget_is_met_when_posterior_scores_tie(trained):
    # inv_sigma after 12 steps at beta2 0.99999: the Hessians of all lambdas are one float32 value,
    # so the triplet scores tie; the allocator still keeps exactly the budget
    results = read_json(trained("bayes-adalora", "--criterion", "inv_sigma") / "results.json")
    assert results["total_rank"] == TARGET_R * len(results["final_ranks"])


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_stsb_regression_reports_correlations_that_a_reload_reproduces(method, trained, glue_dir, tiny_deberta):
    """Pearson of continuous predictions pins the reloaded adapter to the run far more tightly than accuracy."""
    run = trained(method, task="stsb")
    results = read_json(run / "results.json")
    assert results["task"] == "stsb"
    final = results["metrics"]["final"]
    assert set(final) == {"pearson", "spearmanr"}
    texts, labels = dev_examples(glue_dir, "stsb")
    predictions = peft_reloaded_logits(tiny_deberta, run / "adapter", 1, texts)[:, 0].numpy()
    assert np.std(predictions) > 1e-4 * np.abs(predictions).mean()  # not constant: the correlation means something
    assert final["pearson"] == pytest.approx(stats.pearsonr(predictions, labels)[0], abs=1e-5)
    assert final["spearmanr"] == pytest.approx(stats.spearmanr(predictions, labels)[0], abs=1e-5)
    assert results["metrics"]["best"]["pearson"] >= final["pearson"]


# ----------------------------------------------------------------------------- the adapter reloads in plain peft


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_saved_adapter_reloads_in_plain_peft_with_the_runs_predictions(method, trained, glue_dir, tiny_deberta):
    run = trained(method)
    results = read_json(run / "results.json")
    texts, labels = dev_examples(glue_dir, "sst2")
    reloaded = peft_reloaded_logits(tiny_deberta, run / "adapter", 2, texts)

    # the same adapter applied by hand to the base weights
    adapter_config = read_json(run / "adapter" / "adapter_config.json")
    factors, head = adapter_factors(run / "adapter" / "adapter_model.safetensors")
    if method == "lora":
        def scale(name, r):
            return ALPHA / LORA_R
    else:
        # AdaLoRA divides by the rank it started with, kept after pruning (peft's ranknum)
        def scale(name, r):
            return ALPHA / adapter_config["init_r"]
        assert adapter_config["init_r"] == INIT_R
    by_hand = logits_of(hand_merged_model(tiny_deberta, 2, factors, head, scale), tiny_deberta, texts)
    torch.testing.assert_close(reloaded, by_hand, rtol=1e-5, atol=1e-5)

    if method in IVON_METHODS:
        # the weights the run held at the end (posterior means, pruned lambdas exactly 0)
        mean_factors, mean_head = posterior_means(run / "posterior.safetensors")
        for module, f in mean_factors.items():
            kept = f["E"][:, 0] != 0
            torch.testing.assert_close(factors[module]["E"][:, 0], f["E"][kept, 0], rtol=0, atol=0)
            torch.testing.assert_close(factors[module]["A"], f["A"][kept], rtol=0, atol=0)
            torch.testing.assert_close(factors[module]["B"], f["B"][:, kept], rtol=0, atol=0)
        from_run = logits_of(hand_merged_model(tiny_deberta, 2, mean_factors, mean_head, scale), tiny_deberta, texts)
        torch.testing.assert_close(reloaded, from_run, rtol=1e-5, atol=1e-5)

    predictions = reloaded.argmax(-1).numpy()
    assert np.array_equal(predictions, by_hand.argmax(-1).numpy())
    assert accuracy_score(labels, predictions) == results["metrics"]["final"]["accuracy"]


# ----------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("method", ["bayes-adalora", "adalora"])
def test_same_seed_same_run_and_another_seed_differs(method, trained, glue_dir, tiny_deberta, tmp_path):
    first = trained(method)
    again, other = tmp_path / "again", tmp_path / "other"
    assert main(train_argv(glue_dir, tiny_deberta, again, "--method", method, "--seed", "0")) == 0
    assert main(train_argv(glue_dir, tiny_deberta, other, "--method", method, "--seed", "1")) == 0

    a, b = read_json(first / "results.json"), read_json(again / "results.json")
    assert a["metrics"] == b["metrics"]
    assert a["final_ranks"] == b["final_ranks"]
    tensors_a, _ = read_tensors(first / "adapter" / "adapter_model.safetensors")
    tensors_b, _ = read_tensors(again / "adapter" / "adapter_model.safetensors")
    assert tensors_a.keys() == tensors_b.keys()
    for key in tensors_a:
        assert torch.equal(tensors_a[key], tensors_b[key]), key

    tensors_c, _ = read_tensors(other / "adapter" / "adapter_model.safetensors")
    assert any(
        k not in tensors_c or tensors_a[k].shape != tensors_c[k].shape or not torch.equal(tensors_a[k], tensors_c[k])
        for k in tensors_a
    )


# ----------------------------------------------------------------------------- bad input


def write_sst2(root: Path, train: bytes | str | None, dev: str | None = "sentence\tlabel\ngood film\t1\n") -> Path:
    folder = root / "SST-2"
    folder.mkdir(parents=True)
    for name, content in (("train.tsv", train), ("dev.tsv", dev)):
        if content is not None:
            (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def assert_refused(capfd, argv: list[str], out: Path, *named: str) -> str:
    """`helpers.refused`, and no output folder, partial or whole."""
    line = refused(capfd, argv, *named)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no partial folder
    return line


GOOD_TRAIN = "sentence\tlabel\n" + "".join(f"a good film {i}\t{i % 2}\n" for i in range(8))

BAD_FILES = {
    # name: (train.tsv content, dev.tsv content, words the message must hold besides the file name)
    "wrong column count": (GOOD_TRAIN + "a bad film\twith a tab\t0\n", None, ("line 10", "column")),
    "bad label": ("sentence\tlabel\na fine film\t1\na dull film\tmaybe\n", None, ("line 3", "maybe")),
    "empty file": ("", None, ("empty",)),
    "binary file": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x01", None, ()),
    "missing dev file": (GOOD_TRAIN, "MISSING", ("dev.tsv", "does not exist")),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_malformed_data_is_refused_naming_the_file(case, capfd, tmp_path, tiny_deberta):
    train, dev, words = BAD_FILES[case]
    folder = write_sst2(tmp_path / "glue", train, None if dev == "MISSING" else (dev or "sentence\tlabel\nok\t1\n"))
    bad_file = folder / ("dev.tsv" if dev == "MISSING" else "train.tsv")
    out = tmp_path / "out"
    assert_refused(capfd, train_argv(tmp_path / "glue", tiny_deberta, out), out, str(bad_file), *words)


def test_malformed_dev_file_is_refused_too(capfd, tmp_path, tiny_deberta):
    folder = write_sst2(tmp_path / "glue", GOOD_TRAIN, "sentence\tlabel\nfine\t1\nshort row\n")
    out = tmp_path / "out"
    assert_refused(capfd, train_argv(tmp_path / "glue", tiny_deberta, out), out, str(folder / "dev.tsv"), "line 3")


BAD_FLAGS = {
    # name: (extra flags, task, words the message must hold)
    "unknown task": ((), "nosuch", ("nosuch",)),
    "posterior criterion with AdamW adalora": (("--method", "adalora", "--criterion", "snr"), "sst2",
                                               ("--criterion", "snr", "adalora")),
    "posterior criterion with AdamW lora": (("--method", "lora", "--criterion", "snr_abs"), "sst2",
                                            ("--criterion", "lora")),
    "target rank above initial rank": (("--target-r", "8", "--init-r", "4"), "sst2", ("--target-r", "8", "4")),
    "zero steps": (("--max-steps", "0"), "sst2", ("--max-steps",)),
    # peft's sensitivity allocator asks torch.kthvalue for k=0 when the budget never falls
    "equal ranks, nothing to allocate": (("--method", "adalora", "--init-r", "4", "--target-r", "4"), "sst2",
                                         ("--target-r", "--init-r", "lora")),
    "sensitivity EMA outside (0, 1)": (("--method", "adalora", "--sensitivity-beta1", "1.5"), "sst2",
                                       ("--sensitivity-beta1", "(0, 1)", "1.5")),
    "zero IVON Hessian": (("--ivon-hess-init", "0"), "sst2", ("--ivon-hess-init", "(0, inf)")),
    "negative orthogonality penalty": (("--orth-reg", "-0.1"), "sst2", ("--orth-reg", "[0, inf)")),
    "divergence factor below 1": (("--divergence-factor", "-1"), "sst2", ("--divergence-factor", "at least 1")),
    "target modules match nothing": (("--target-modules", "nomatch"), "sst2", ("nomatch",)),
    "no budgeting phase": (("--tinit", "6", "--tfinal", "6"), "sst2", ("--tinit", "--tfinal")),
    "paper recipe for wnli": (("--recipe", "paper"), "wnli", ("wnli",)),
}


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_bad_flags_are_refused_with_one_line(case, capfd, tmp_path, glue_dir, tiny_deberta):
    extra, task, words = BAD_FLAGS[case]
    argv = train_argv(glue_dir, tiny_deberta, tmp_path / "out", *extra, task=task)
    if "--max-steps" in extra:  # the last --max-steps wins in argparse; keep only the bad one
        i = argv.index("--max-steps")
        del argv[i : i + 2]
    assert_refused(capfd, argv, tmp_path / "out", *words)


NUMBER_FIELDS = [f for f in config_fields() if bounds_of(f) is not None]


def refused_values(f) -> list[str]:
    """What a number flag must refuse, generated from its field's bounds: NaN, inf, and 0, a negative
    value and one above its top where those are outside."""
    bounds = bounds_of(f)
    values = ["nan", "inf"] + [str(v) for v in (0, -1) if not bounds.contains(v)]
    if math.isfinite(bounds.high):
        values.append(str(int(bounds.high) + 1))
    return values


@pytest.mark.parametrize("f", NUMBER_FIELDS, ids=lambda f: f.name)
def test_every_number_flag_refuses_nan_inf_and_out_of_range_values_in_one_line(f, capfd, tmp_path, glue_dir,
                                                                               tiny_deberta):
    flag = "--" + f.name.replace("_", "-")
    for value in refused_values(f):
        argv = train_argv(glue_dir, tiny_deberta, tmp_path / "out", flag, value)
        if f.name == "max_steps":  # the last --max-steps wins in argparse; keep only the bad one
            del argv[argv.index("--max-steps") : argv.index("--max-steps") + 2]
        line = assert_refused(capfd, argv, tmp_path / "out", flag)
        assert value in line, line


def test_missing_data_folder_is_refused(capfd, tmp_path, tiny_deberta):
    missing = tmp_path / "no-such-folder"
    out = tmp_path / "out"
    assert_refused(capfd, train_argv(missing, tiny_deberta, out), out, str(missing))


def test_installed_command_prints_one_line_and_no_traceback(tmp_path, glue_dir, tiny_deberta):
    """The real console script, outside pytest's warning capture, on a failure found after loading the model."""
    script = Path(sys.executable).with_name("bayes-adalora")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "bayes_adalora.cli"]
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command + train_argv(glue_dir, tiny_deberta, out, "--method", "adalora",
                                               "--tinit", "10", "--tfinal", "2"),
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "--tinit 10" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_a_refused_flag_does_not_wait_for_peft(tmp_path, glue_dir, tiny_deberta):
    """The settings are checked before peft and the training code load (about 7 s of a refusal's 11 on 2 cores)."""
    out = tmp_path / "out"
    code = (
        "import sys\n"
        "from bayes_adalora.cli import main\n"
        f"code = main({train_argv(glue_dir, tiny_deberta, out, '--learning-rate', '-1')!r})\n"
        "print(code, sorted(m for m in ('peft', 'bayes_adalora.train') if m in sys.modules))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.split("\n")[0] == "2 []", done.stdout + done.stderr
    assert "--learning-rate" in done.stderr and not out.exists()


# ----------------------------------------------------------------------------- an existing run


def test_existing_run_is_refused_and_kept_unless_overwrite(capfd, trained, tmp_path, glue_dir, tiny_deberta):
    out = tmp_path / "run"
    shutil.copytree(trained("bayes-adalora"), out)
    (out / "sigma.png").write_bytes(b"an old run's figure")  # as `bayes-adalora plot` would have left
    assert (out / "correlations.json").exists()
    before = folder_snapshot(out)

    capfd.readouterr()
    assert main(train_argv(glue_dir, tiny_deberta, out, "--method", "lora")) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "--overwrite" in err[0]
    assert folder_snapshot(out) == before

    assert main(train_argv(glue_dir, tiny_deberta, out, "--method", "lora", "--overwrite")) == 0
    results = read_json(out / "results.json")
    assert results["method"] == "lora" and results["criterion"] is None
    for stale in (
        "posterior.safetensors",
        "correlations.json",
        "sigma.png",
    ):  # the old run is replaced, not merged into
        assert not (out / stale).exists(), stale
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no partial folder left behind


@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)], ids=["plain", "overwrite"])
def test_folder_of_other_files_is_refused_before_training_and_kept(overwrite, capfd, tmp_path, glue_dir, tiny_deberta):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("not a run\n")
    before = folder_snapshot(out)
    capfd.readouterr()
    assert main(train_argv(glue_dir, tiny_deberta, out, "--method", "lora", *overwrite)) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0]
    assert folder_snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_empty_existing_folder_takes_the_run(tmp_path, glue_dir, tiny_deberta):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(train_argv(glue_dir, tiny_deberta, out, "--method", "lora")) == 0
    assert read_json(out / "results.json")["method"] == "lora"


@pytest.mark.parametrize("command", [[], ["train"], ["evaluate"], ["plot"]])
def test_help_prints_every_flag_and_exits_zero(command, capsys):
    # argparse %-formats help texts: a bare "%" in one (e.g. "6% of the run") used to crash --help
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: bayes-adalora")
    if command == ["train"]:
        assert "6% of the run" in out and "--ivon-beta2" in out and "[default: auto]" in out


def test_version_is_the_package_s_and_pyproject_s(capsys):
    import re

    import bayes_adalora

    assert main(["--version"]) == 0
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"$', pyproject, re.MULTILINE).group(1)  # (tomllib is 3.11+)
    assert capsys.readouterr().out == f"bayes-adalora {version}\n"
    assert bayes_adalora.__version__ == version


def test_config_file_reruns_a_run_and_explicit_flags_win(trained, tmp_path):
    """`train --config run/config.json` gives the same run again (every default was resolved in the file)."""
    first = trained("bayes-adalora")
    again = tmp_path / "again"
    assert main(["train", "--config", str(first / "config.json"), "--output-dir", str(again)]) == 0
    a, b = read_json(first / "results.json"), read_json(again / "results.json")
    assert a["metrics"] == b["metrics"] and a["final_ranks"] == b["final_ranks"]
    assert (first / "adapter" / "adapter_model.safetensors").read_bytes() == (
        again / "adapter" / "adapter_model.safetensors").read_bytes()
    other = tmp_path / "other"
    assert main(["train", "--config", str(first / "config.json"), "--output-dir", str(other), "--seed", "1"]) == 0
    # the lr derived again: IVON's default, 3 / the initial Hessian 0.1
    assert read_json(other / "config.json")["seed"] == 1 and read_json(other / "config.json")["learning_rate"] == 30.0


def test_a_config_file_that_is_not_an_object_is_refused(capfd, tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("[1, 2]\n")
    assert main(["train", "--config", str(bad), "--output-dir", str(tmp_path / "out")]) == 2
    assert "must hold a JSON object" in capfd.readouterr().err and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- lambda's initial value


def test_lambda_init_paper_draws_every_lambda_from_n_0_002(tiny_deberta):
    from peft import AdaLoraConfig, get_peft_model
    from peft.tuners.adalora import AdaLoraLayer
    from transformers import AutoModelForSequenceClassification

    from bayes_adalora.adapters import PAPER_LAMBDA_STD, init_lambdas_normal

    base = AutoModelForSequenceClassification.from_pretrained(tiny_deberta, num_labels=2)
    model = get_peft_model(base, AdaLoraConfig(init_r=INIT_R, target_r=TARGET_R, total_step=10,
                                               target_modules=list(DEBERTA_TARGETS)))
    lambdas = [lam for m in model.modules() if isinstance(m, AdaLoraLayer) for lam in m.lora_E.values()]
    assert all(bool((lam == 0).all()) for lam in lambdas)  # peft's own start: zero
    torch.manual_seed(0)
    init_lambdas_normal(model, PAPER_LAMBDA_STD)
    values = torch.cat([lam.detach().flatten() for lam in lambdas])
    assert bool((values != 0).all())
    # n draws of N(0, 0.02^2): the sample std lies within 4 standard errors (sd of s ~ sigma / sqrt(2n))
    n = values.numel()
    assert abs(values.std().item() - 0.02) < 4 * 0.02 / math.sqrt(2 * n)
    assert abs(values.mean().item()) < 4 * 0.02 / math.sqrt(n)


@pytest.mark.parametrize("method", ["bayes-adalora", "adalora"])
def test_lambda_init_paper_trains_and_its_adapter_reloads_in_plain_peft(method, trained, glue_dir, tiny_deberta):
    run = trained(method, "--lambda-init", "paper")
    default = trained(method)
    assert read_json(run / "config.json")["lambda_init"] == "paper"
    results = read_json(run / "results.json")
    assert results["total_rank"] == TARGET_R * len(results["final_ranks"])
    factors, _ = adapter_factors(run / "adapter" / "adapter_model.safetensors")
    zero_factors, _ = adapter_factors(default / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(factors[m]["E"], zero_factors[m]["E"]) for m in factors)  # it changed the run
    texts, labels = dev_examples(glue_dir, "sst2")
    predictions = peft_reloaded_logits(tiny_deberta, run / "adapter", 2, texts).argmax(-1).numpy()
    assert accuracy_score(labels, predictions) == results["metrics"]["final"]["accuracy"]


def test_lambda_init_with_lora_is_refused(capfd, tmp_path, glue_dir, tiny_deberta):
    assert main(train_argv(glue_dir, tiny_deberta, tmp_path / "r", "--method", "lora", "--lambda-init", "paper")) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lambda-init" in err[0] and not (tmp_path / "r").exists()
