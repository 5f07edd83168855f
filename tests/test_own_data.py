"""`--task classification` and `--task regression` on the user's own files: classes read from the data,
their names stored and written back, every method, evaluate, resume, and the refusals."""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import accuracy_score, matthews_corrcoef

from bayes_adalora.cli import main
from bayes_adalora.config import TrainConfig
from bayes_adalora.data import load_task_data
from bayes_adalora.errors import UserError
from bayes_adalora.run_io import evaluate_run
from bayes_adalora.tasks import class_order
from test_resume import assert_same_run

METHODS = ("full", "lora", "adalora", "adalora-ivon", "bayes-adalora")

# Five classes named by strings; "Yellow" sorts first by code point (upper case before lower case).
COLOURS = {"red": ["apple", "cherry", "rose"], "green": ["grass", "leaf", "frog"], "blue": ["sky", "sea", "ocean"],
           "Yellow": ["sun", "lemon", "banana"], "black": ["night", "coal", "crow"]}
COLOUR_ORDER = ["Yellow", "black", "blue", "green", "red"]  # written out by hand, not computed
NUMBERS = {30: ["one", "two"], 2: ["three", "four"], 10: ["five", "six"]}  # integer classes: 2 < 10 < 30
NUMBER_ORDER = ["2", "10", "30"]


def keyword_rows(classes: dict, n: int, seed: int) -> list[tuple[str, object]]:
    """Sentences whose class is given by one keyword among fillers: a learnable pattern."""
    rng = random.Random(seed)
    names = list(classes)
    rows = []
    for i in range(n):
        name = names[i % len(names)]
        rows.append((f"the {rng.choice(classes[name])} is {rng.choice(['here', 'there', 'near', 'far'])} .", name))
    return rows


def write_csv(path: Path, header: list[str], rows) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_predictions(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def train_argv(train: Path, dev: Path, model, out: Path, *extra: str, task: str = "classification") -> list[str]:
    return ["train", "--task", task, "--train-file", str(train), "--validation-file", str(dev), "--model", str(model),
            "--output-dir", str(out), "--max-length", "16", "--batch-size", "8", "--no-progress", *extra]


# ----------------------------------------------------------------------------- five string classes, end to end


@pytest.fixture(scope="module")
def colour_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("colours")
    train = write_csv(root / "train.csv", ["sentence", "colour"], keyword_rows(COLOURS, 100, 0))
    dev = write_csv(root / "dev.csv", ["sentence", "colour"], keyword_rows(COLOURS, 25, 1))
    return train, dev


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory, colour_files, minilm_path) -> Path:
    """The packaged MiniLM, bayes-adalora (the default), 24 steps, posterior predictive and figures."""
    out = tmp_path_factory.mktemp("colour-run") / "run"
    train, dev = colour_files
    assert main(train_argv(train, dev, minilm_path, out, "--text-columns", "sentence", "--label-column", "colour",
                           "--max-steps", "24", "--mc-samples", "2", "--eval-steps", "12")) == 0
    return out


def test_five_string_classes_beat_chance_and_the_run_names_them(colour_run, colour_files):
    results = json.loads((colour_run / "results.json").read_text())
    assert results["task"] == "classification" and results["main_metric"] == "accuracy"
    assert results["id2label"] == {str(i): name for i, name in enumerate(COLOUR_ORDER)}
    assert results["label2id"] == {name: i for i, name in enumerate(COLOUR_ORDER)}
    assert json.loads((colour_run / "config.json").read_text())["labels"] == COLOUR_ORDER
    assert json.loads((colour_run / "adapter" / "labels.json").read_text()) == {
        "id2label": results["id2label"], "label2id": results["label2id"]}
    final = results["metrics"]["final"]
    assert {"accuracy", "macro_f1", "matthews_correlation", "ece", "nll", "brier", "aurc"} <= set(final)
    assert final["accuracy"] >= 0.5  # chance is 0.2: 13 of 25 right by chance has probability below 1e-4
    assert results["metrics"]["mc"]["samples"] == 2
    assert (colour_run / "posterior.safetensors").is_file()
    assert {"ranks.png", "training.png", "sigma.png"} <= {p.name for p in colour_run.glob("*.png")}


def test_evaluate_gives_back_the_runs_metrics_and_writes_class_names(colour_run, colour_files, tmp_path):
    results = json.loads((colour_run / "results.json").read_text())
    evaluated = evaluate_run(colour_run, mc_samples=2, predictions=str(tmp_path / "mc.csv"))
    assert evaluated["metrics"]["point"] == results["metrics"]["final"]
    assert evaluated["metrics"]["mc"] == results["metrics"]["mc"]

    assert main(["evaluate", str(colour_run), "--predictions", str(tmp_path / "point.csv")]) == 0
    rows = read_predictions(tmp_path / "point.csv")
    with open(colour_files[1], newline="") as f:
        truth = [r["colour"] for r in csv.DictReader(f)]
    predicted = [r["prediction"] for r in rows]
    assert set(predicted) <= set(COLOURS) and len(predicted) == len(truth)
    final = results["metrics"]["final"]
    assert accuracy_score(truth, predicted) == final["accuracy"]
    assert matthews_corrcoef(truth, predicted) == pytest.approx(final["matthews_correlation"], abs=1e-12)
    # macro-F1 by hand: the mean over the classes that occur of 2 tp / (2 tp + fp + fn)
    f1 = []
    for name in set(truth) | set(predicted):
        tp = sum(t == p == name for t, p in zip(truth, predicted))
        fp = sum(p == name != t for t, p in zip(truth, predicted))
        fn = sum(t == name != p for t, p in zip(truth, predicted))
        f1.append(2 * tp / (2 * tp + fp + fn))
    assert final["macro_f1"] == pytest.approx(np.mean(f1), abs=1e-12)


def test_stock_peft_reload_maps_its_predictions_to_the_class_names(colour_run, colour_files, minilm_path, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    id2label = json.loads((colour_run / "adapter" / "labels.json").read_text())["id2label"]  # JSON: "0": name
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=len(id2label))
    model = PeftModel.from_pretrained(base, colour_run / "adapter").eval()
    with open(colour_files[1], newline="") as f:
        texts = [r["sentence"] for r in csv.DictReader(f)]
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    with torch.no_grad():
        logits = model(**tokenizer(texts, truncation=True, max_length=16, padding=True, return_tensors="pt")).logits
    names = [id2label[str(int(i))] for i in logits.argmax(-1)]
    assert main(["evaluate", str(colour_run), "--predictions", str(tmp_path / "p.csv")]) == 0
    assert names == [r["prediction"] for r in read_predictions(tmp_path / "p.csv")]


def test_evaluate_predicts_class_names_for_a_file_without_labels(colour_run, colour_files, tmp_path, capfd):
    with open(colour_files[1], newline="") as f:
        texts = [r["sentence"] for r in csv.DictReader(f)]
    new = write_jsonl(tmp_path / "new.jsonl", [{"sentence": t} for t in texts])  # no "colour"
    assert main(["evaluate", str(colour_run), "--data-file", str(new)]) == 2
    assert "pass --predictions" in capfd.readouterr().err
    evaluated = evaluate_run(colour_run, data_file=str(new), predictions=str(tmp_path / "new.csv"))
    assert evaluated["metrics"]["point"] == {}  # nothing to score
    evaluate_run(colour_run, predictions=str(tmp_path / "dev.csv"))
    assert read_predictions(tmp_path / "new.csv") == read_predictions(tmp_path / "dev.csv")


# ----------------------------------------------------------------------------- integer and string labels


def test_class_order_is_numeric_for_integers_and_by_code_point_otherwise():
    assert class_order(["10", "2", "1", "2"]) == ("1", "2", "10")
    assert class_order(["-3", "7", "0"]) == ("-3", "0", "7")
    assert class_order(["b", "B", "a"]) == ("B", "a", "b")
    assert class_order(["2", "b", "10"]) == ("10", "2", "b")  # not all integers: all compared as text


def test_integer_labels_in_csv_json_and_parquet_are_the_same_classes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = keyword_rows(NUMBERS, 9, 0)
    train = write_csv(tmp_path / "train.csv", ["text", "label"], rows)
    # JSON integers and the same numbers as text name the same classes as the CSV's "10", "2", "30"
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"text": "a", "label": 2}, {"text": "b", "label": "30"},
                                               {"text": "c", "label": 10}])
    data = load_task_data("classification", train_file=train, validation_file=dev)
    assert data.spec.labels == tuple(NUMBER_ORDER)
    assert data.dev["dev"].labels == [0, 2, 1]
    assert data.train.labels == [NUMBER_ORDER.index(str(y)) for _, y in rows]
    # a Parquet file (nullable integers come back as floats there) and text label columns read the same
    pq.write_table(pa.table({"text": [t for t, _ in rows], "label": [float(y) for _, y in rows]}),
                   tmp_path / "train.parquet")
    again = load_task_data("classification", train_file=tmp_path / "train.parquet", validation_file=dev)
    assert again.spec == data.spec and again.train.labels == data.train.labels
    assert again.train.texts == data.train.texts


def test_whole_numbers_written_as_floats_are_the_integer_classes(tmp_path):
    """pandas writes an integer column with nulls as 1.0, 2.0: the classes a JSON file's 1, 2 are."""
    train = write_csv(tmp_path / "train.csv", ["text", "label"], [("a", "1.0"), ("b", "2.0"), ("c", " 10.00 ")])
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"text": "d", "label": 2}, {"text": "e", "label": "1"}])
    data = load_task_data("classification", train_file=train, validation_file=dev)
    assert data.spec.labels == ("1", "2", "10")  # numeric order: they are integers
    assert data.train.labels == [0, 1, 2] and data.dev["dev"].labels == [1, 0]


def test_json_true_false_labels_are_the_classes_a_csv_spells_true_and_false(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": True}, {"text": "b", "label": False},
                                                   {"text": "c", "label": True}])
    dev = write_csv(tmp_path / "dev.csv", ["text", "label"], [("d", "false"), ("e", "true")])
    data = load_task_data("classification", train_file=train, validation_file=dev)
    assert data.spec.labels == ("false", "true")  # code-point order
    assert data.train.labels == [1, 0, 1] and data.dev["dev"].labels == [0, 1]


def test_two_text_columns_given_as_a_b_or_a_comma_b(tmp_path):
    rows = [("x y", "z", "p"), ("u", "v w", "q")]
    path = write_csv(tmp_path / "pairs.csv", ["first", "second", "label"], rows)
    for given in (["first", "second"], ["first,second"]):  # --text-columns first second, or first,second
        config = TrainConfig(task="classification", train_file=str(path), validation_file=str(path),
                             text_columns=given)
        assert config.text_columns == ["first", "second"]
        data = load_task_data("classification", train_file=path, validation_file=path,
                              text_columns=config.text_columns)
        assert data.train.texts == [("x y", "z"), ("u", "v w")] and data.spec.labels == ("p", "q")


@pytest.fixture(scope="module")
def number_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("numbers")
    train = write_jsonl(root / "train.jsonl", [{"text": t, "label": y} for t, y in keyword_rows(NUMBERS, 48, 0)])
    dev = write_jsonl(root / "dev.jsonl", [{"text": t, "label": y} for t, y in keyword_rows(NUMBERS, 12, 1)])
    return train, dev


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_integer_classes_and_evaluate_reproduces_it(method, number_files, tiny_deberta,
                                                                         tmp_path):
    out = tmp_path / "run"
    assert main(train_argv(*number_files, tiny_deberta, out, "--method", method, "--max-steps", "4",
                           "--no-plots")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["id2label"] == {str(i): name for i, name in enumerate(NUMBER_ORDER)}
    if method == "full":  # the saved model's own config names the classes
        config = json.loads((out / "model" / "config.json").read_text())
        assert config["id2label"] == results["id2label"]
    evaluated = evaluate_run(out, predictions=str(tmp_path / "p.csv"))
    assert evaluated["metrics"]["point"] == results["metrics"]["final"]
    assert {r["prediction"] for r in read_predictions(tmp_path / "p.csv")} <= set(NUMBER_ORDER)


def test_a_base_fine_tuned_for_two_classes_trains_three_with_a_new_head(number_files, tiny_deberta, tmp_path):
    """An SST-2 checkpoint's 2-way head cannot hold 3 classes: it is new here (a traceback before), trained in
    full, saved with the adapter and read back by evaluate over the 2-way base."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    two_way = tmp_path / "two-way"
    AutoModelForSequenceClassification.from_pretrained(str(tiny_deberta), num_labels=2).save_pretrained(two_way)
    for f in tiny_deberta.iterdir():
        if "token" in f.name or f.name == "vocab.txt":
            shutil.copy(f, two_way / f.name)
    out = tmp_path / "run"
    assert main(train_argv(*number_files, two_way, out, "--max-steps", "2", "--no-plots")) == 0
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert [tuple(t.shape) for k, t in saved.items() if "classifier.weight" in k] == [(3, 32)]
    results = json.loads((out / "results.json").read_text())
    assert evaluate_run(out)["metrics"]["point"] == results["metrics"]["final"]


# ----------------------------------------------------------------------------- regression


@pytest.fixture(scope="module")
def score_files(tmp_path_factory) -> tuple[Path, Path]:
    """A score that grows with one word's rank among five, plus noise."""
    root = tmp_path_factory.mktemp("scores")
    words = ["zero", "one", "two", "three", "four"]
    files = []
    for split, n, seed in (("train", 48, 0), ("dev", 16, 1)):
        rng = random.Random(seed)
        rows = [(f"it was {words[i % 5]} .", f"{i % 5 + rng.gauss(0, 0.1):.3f}") for i in range(n)]
        files.append(write_csv(root / f"{split}.csv", ["text", "score"], rows))
    return files[0], files[1]


def test_regression_reports_pearson_spearman_mse_and_evaluate_reproduces_them(score_files, tiny_deberta, tmp_path):
    out = tmp_path / "run"
    assert main(train_argv(*score_files, tiny_deberta, out, "--task", "regression", "--label-column", "score",
                           "--max-steps", "6", "--mc-samples", "2", "--no-plots")) == 0
    results = json.loads((out / "results.json").read_text())
    final = results["metrics"]["final"]
    assert set(final) == {"pearson", "spearmanr", "mse"} and results["main_metric"] == "pearson"
    assert "id2label" not in results and json.loads((out / "config.json").read_text())["labels"] is None
    evaluated = evaluate_run(out, mc_samples=2)
    assert evaluated["metrics"]["point"] == final and evaluated["metrics"]["mc"] == results["metrics"]["mc"]
    evaluate_run(out, predictions=str(tmp_path / "p.csv"))
    values = np.array([float(r["value"]) for r in read_predictions(tmp_path / "p.csv")])
    with open(score_files[1], newline="") as f:
        truth = np.array([float(r["score"]) for r in csv.DictReader(f)])
    # the run holds labels and predictions in float32: equal to float32 precision
    assert final["mse"] == pytest.approx(np.mean((values - truth) ** 2), rel=1e-6)
    assert final["pearson"] == pytest.approx(stats.pearsonr(values, truth)[0], abs=1e-6)


# ----------------------------------------------------------------------------- resume


def test_a_resumed_classification_run_equals_the_uninterrupted_one(number_files, tiny_deberta, tmp_path):
    args = ("--max-steps", "8", "--save-steps", "4", "--eval-steps", "4", "--no-plots")
    reference = tmp_path / "reference"
    assert main(train_argv(*number_files, tiny_deberta, reference, *args)) == 0
    resumed = tmp_path / "resumed"
    assert main(train_argv(*number_files, tiny_deberta, resumed, *args, "--resume-from-checkpoint",
                           str(reference / "checkpoints" / "checkpoint-4"))) == 0
    assert_same_run(reference, resumed)


# ----------------------------------------------------------------------------- refusals


def refusal_cases(root: Path) -> dict[str, tuple[list[str], str]]:
    """name: (train argv after the model and output folder, a phrase of the one-line error)."""
    good = write_csv(root / "good.csv", ["text", "label"], [("a", "x"), ("b", "y")])

    def csv_file(name, header, rows):
        return str(write_csv(root / name, header, rows))

    return {
        "missing label column": (["--train-file", csv_file("nolabel.csv", ["text", "tag"], [("a", "x")]),
                                  "--validation-file", str(good)], "no column 'label'"),
        "missing text column": (["--train-file", str(good), "--validation-file", str(good),
                                 "--text-columns", "body"], "no column 'body'"),
        "empty file": (["--train-file", str(good), "--validation-file", str(root / "empty.csv")], "empty"),
        "header only": (["--train-file", csv_file("header.csv", ["text", "label"], []),
                         "--validation-file", str(good)], "has no examples"),
        "one class": (["--train-file", csv_file("one.csv", ["text", "label"], [("a", "x"), ("b", "x")]),
                       "--validation-file", str(good)], "at least two classes"),
        "unseen dev label": (["--train-file", str(good),
                              "--validation-file", csv_file("dev.csv", ["text", "label"], [("a", "z")])],
                             "label 'z' does not occur in the training data"),
        "empty label": (["--train-file", csv_file("blank.csv", ["text", "label"], [("a", "x"), ("b", " ")]),
                         "--validation-file", str(good)], "the label is empty"),
        "fractional class": (["--train-file", str(write_jsonl(root / "half.jsonl", [{"text": "a", "label": 0.5}])),
                              "--validation-file", str(good)], "neither text nor a whole number"),
        "fraction as text": (["--train-file", csv_file("halves.csv", ["text", "label"], [("a", "1"), ("b", "0.5")]),
                              "--validation-file", str(good)], "label 0.5 is neither text nor a whole number"),
        "regression text label": (["--task", "regression", "--train-file", str(good), "--validation-file", str(good)],
                                  "label 'x' is not a number"),
        "no train file": (["--validation-file", str(good)], "give --train-file and --validation-file"),
        "unknown file type": (["--train-file", str(root / "data.xlsx"), "--validation-file", str(good)],
                              "unknown file type"),
        "parquet without the column": (["--train-file", str(root / "t.parquet"), "--validation-file", str(good)],
                                       "no column 'label'"),
        "not parquet": (["--train-file", str(root / "bad.parquet"), "--validation-file", str(good)],
                        "not a readable Parquet file"),
        "three text columns": (["--train-file", str(good), "--validation-file", str(good),
                                "--text-columns", "a,b,c"], "one or two column names"),
    }


CASE_NAMES = ["missing label column", "missing text column", "empty file", "header only", "one class",
              "unseen dev label", "empty label", "fractional class", "fraction as text", "regression text label",
              "no train file", "unknown file type", "parquet without the column", "not parquet", "three text columns"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_data_is_refused_in_one_sentence_before_anything_is_written(name, tmp_path, tiny_deberta, capfd):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "data.xlsx").write_bytes(b"PK")
    (tmp_path / "bad.parquet").write_text("text,label\na,x\n")
    pq.write_table(pa.table({"text": ["a"], "tag": ["x"]}), tmp_path / "t.parquet")
    argv, phrase = refusal_cases(tmp_path)[name]
    task = [] if "--task" in argv else ["--task", "classification"]
    out = tmp_path / "out"
    code = main(["train", *task, "--model", str(tiny_deberta), "--output-dir", str(out), "--no-progress", *argv])
    err = capfd.readouterr().err.strip()
    assert code == 2 and phrase in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_evaluate_refuses_a_glue_folder_and_unseen_classes_for_a_classification_run(colour_run, tmp_path, capfd):
    assert main(["evaluate", str(colour_run), "--data-dir", str(tmp_path)]) == 2
    assert "--data-file" in capfd.readouterr().err
    other = write_csv(tmp_path / "other.csv", ["sentence", "colour"], [("the sky is here .", "purple")])
    with pytest.raises(UserError, match="label 'purple' does not occur in the training data"):
        evaluate_run(colour_run, data_file=str(other))


def test_make_trainer_reads_the_classes_of_the_users_training_file(colour_files, tiny_deberta, tmp_path):
    from transformers import TrainingArguments

    from bayes_adalora.hf_trainer import make_trainer

    train, dev = colour_files
    config = TrainConfig(task="classification", method="adalora", train_file=str(train), validation_file=str(dev),
                         text_columns=["sentence"], label_column="colour", init_r=4, target_r=2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, report_to=[], use_cpu=True)
    trainer = make_trainer(tiny_deberta, [{"input_ids": [1, 2], "labels": 0}], None, config, args)  # a Path
    labels = trainer.model.base_model.model.config.id2label
    assert [labels[i] for i in range(len(labels))] == COLOUR_ORDER
