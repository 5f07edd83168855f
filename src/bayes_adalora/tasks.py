"""The one place that knows each task: each GLUE task's files, text columns, labels and official
metrics, the tasks on the user's own data (`classification`, `regression`), whose classes come
from the training file, and the decoder-LM tasks (causal-LM tuning, multiple-choice scoring)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class TaskSpec:
    """What a GLUE task is, in the standard TSV layout and on the hub.

    `tsv_text_columns` / `tsv_label_column` name header columns, or give 0-based positions for a
    headerless file (CoLA). `labels` lists the label strings in class-index order, which is also
    the hub's order; None means regression (STS-B).
    """

    name: str
    glue_dir: str
    tsv_has_header: bool
    tsv_column_count: int | None  # None: the header decides
    tsv_text_columns: tuple[str | int, ...]
    tsv_label_column: str | int
    hub_text_columns: tuple[str, ...]
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    main_metric: str
    label_range: tuple[float, float] = (-math.inf, math.inf)  # regression: the scores a label may take
    dev_splits: tuple[str, ...] = ("dev",)
    hub_dev_splits: tuple[str, ...] = ("validation",)
    from_data: bool = False  # the user's own data: labels are names (never class indices), no GLUE files

    higher_is_better = True  # of the main metric (class attributes: not fields)
    peft_task_type = "SEQ_CLS"  # peft's TaskType of the adapter
    kind = "classifier"  # the kind of task (`kinds.KINDS`): how its data are read, batched and evaluated

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    def metric_name(self, split: str, metric: str) -> str:
        """The key of `metric` on dev split `split` in results: plain for one dev split, suffixed for MNLI."""
        if len(self.dev_splits) == 1:
            return metric
        return f"{metric}_{split.removeprefix('dev_')}"

    def metric_names(self) -> list[str]:
        return [self.metric_name(split, m) for split in self.dev_splits for m in self.metrics]

    @property
    def main_metric_name(self) -> str:
        return self.metric_name(self.dev_splits[0], self.main_metric)


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="cola",
            glue_dir="CoLA",
            tsv_has_header=False,
            tsv_column_count=4,
            tsv_text_columns=(3,),
            tsv_label_column=1,
            hub_text_columns=("sentence",),
            labels=_BINARY,
            metrics=("matthews_correlation",),
            main_metric="matthews_correlation",
        ),
        TaskSpec(
            name="sst2",
            glue_dir="SST-2",
            tsv_has_header=True,
            tsv_column_count=None,
            tsv_text_columns=("sentence",),
            tsv_label_column="label",
            hub_text_columns=("sentence",),
            labels=_BINARY,
            metrics=("accuracy",),
            main_metric="accuracy",
        ),
        TaskSpec(
            name="mrpc",
            glue_dir="MRPC",
            tsv_has_header=True,
            tsv_column_count=None,
            tsv_text_columns=("#1 String", "#2 String"),
            tsv_label_column="Quality",
            hub_text_columns=("sentence1", "sentence2"),
            labels=_BINARY,
            metrics=("f1", "accuracy"),
            main_metric="f1",
        ),
        TaskSpec(
            name="stsb",
            glue_dir="STS-B",
            tsv_has_header=True,
            tsv_column_count=None,
            tsv_text_columns=("sentence1", "sentence2"),
            tsv_label_column="score",
            hub_text_columns=("sentence1", "sentence2"),
            labels=None,
            metrics=("pearson", "spearmanr"),
            main_metric="pearson",
            label_range=(0.0, 5.0),
        ),
        TaskSpec(
            name="qqp",
            glue_dir="QQP",
            tsv_has_header=True,
            tsv_column_count=None,
            tsv_text_columns=("question1", "question2"),
            tsv_label_column="is_duplicate",
            hub_text_columns=("question1", "question2"),
            labels=_BINARY,
            metrics=("f1", "accuracy"),
            main_metric="f1",
        ),
        TaskSpec(
            name="mnli",
            glue_dir="MNLI",
            tsv_has_header=True,
            tsv_column_count=None,
            tsv_text_columns=("sentence1", "sentence2"),
            tsv_label_column="gold_label",
            hub_text_columns=("premise", "hypothesis"),
            labels=("entailment", "neutral", "contradiction"),
            metrics=("accuracy",),
            main_metric="accuracy",
            dev_splits=("dev_matched", "dev_mismatched"),
            hub_dev_splits=("validation_matched", "validation_mismatched"),
        ),
        TaskSpec(
            name="qnli",
            glue_dir="QNLI",
            tsv_has_header=True,
            tsv_column_count=None,
            tsv_text_columns=("question", "sentence"),
            tsv_label_column="label",
            hub_text_columns=("question", "sentence"),
            labels=_NLI2,
            metrics=("accuracy",),
            main_metric="accuracy",
        ),
        TaskSpec(
            name="rte",
            glue_dir="RTE",
            tsv_has_header=True,
            tsv_column_count=None,
            tsv_text_columns=("sentence1", "sentence2"),
            tsv_label_column="label",
            hub_text_columns=("sentence1", "sentence2"),
            labels=_NLI2,
            metrics=("accuracy",),
            main_metric="accuracy",
        ),
        TaskSpec(
            name="wnli",
            glue_dir="WNLI",
            tsv_has_header=True,
            tsv_column_count=None,
            tsv_text_columns=("sentence1", "sentence2"),
            tsv_label_column="label",
            hub_text_columns=("sentence1", "sentence2"),
            labels=_BINARY,
            metrics=("accuracy",),
            main_metric="accuracy",
        ),
    )
}


# ----------------------------------------------------------------------------- tasks on the user's own data

DATA_TASKS = ("classification", "regression")
DATA_TEXT_COLUMNS = ("text",)  # --text-columns' default for the user's own data; --label-column's is "label"
_INTEGER = re.compile(r"^[+-]?\d+$")


def data_task_spec(name: str, labels: Iterable[str] | None = None) -> TaskSpec:
    """The spec of a task on the user's own data: `classification` with the class names `labels`
    in class-index order (see `class_order`; none given: the classes are still to be read from the
    training file, `data.spec_from_labels`), or `regression`. Main metric: accuracy, or Pearson's r."""
    common = dict(name=name, glue_dir="", tsv_has_header=True, tsv_column_count=None, tsv_text_columns=(),
                  tsv_label_column="label", hub_text_columns=DATA_TEXT_COLUMNS, from_data=True)
    if name == "regression":
        return TaskSpec(labels=None, metrics=("pearson", "spearmanr", "mse"), main_metric="pearson", **common)
    return TaskSpec(labels=tuple(labels or ()), metrics=("accuracy", "macro_f1", "matthews_correlation"),
                    main_metric="accuracy", **common)


def class_order(names: Iterable[str]) -> tuple[str, ...]:
    """The classes found in the training labels, in class-index order: numerically when every name is
    an integer ("2" before "10"), else by Unicode code point (Python's `sorted`: "B" before "a")."""
    distinct = set(names)
    if all(_INTEGER.match(n) for n in distinct):
        return tuple(sorted(distinct, key=lambda n: (int(n), n)))
    return tuple(sorted(distinct))


def is_data_task(name: str) -> bool:
    return name.lower() in DATA_TASKS


def check_own_files(task: str, train_file, validation_file) -> None:
    """Refuse a task on the user's own data without its two files."""
    if is_data_task(task) and not (train_file and validation_file):
        raise UserError(f"--task {task} trains on your own data: give --train-file and --validation-file")



@dataclass(frozen=True)
class LMTaskSpec:
    """A task for a decoder LM, read from the user's --train-file / --validation-file (one dev split).

    causal-lm: the mean negative log-likelihood per completion token ("nll", the main metric, lower
    is better) and its exp, "perplexity". multiple-choice: "accuracy" of the best-scored choice, plus
    the calibration metrics of classification over the softmax of the choices' scores.
    """

    name: str
    metrics: tuple[str, ...]
    main_metric: str
    higher_is_better: bool
    kind: str  # the kind of task (`kinds.KINDS`): how its data are read, batched and evaluated
    dev_splits: tuple[str, ...] = ("dev",)
    peft_task_type = "CAUSAL_LM"
    is_regression = False  # multiple choice is a classification over the choices
    num_labels = 0  # no classification head
    labels = None  # and no classes to name
    from_data = True  # read from the user's files

    def metric_name(self, split: str, metric: str) -> str:
        return metric

    def metric_names(self) -> list[str]:
        return list(self.metrics)

    @property
    def main_metric_name(self) -> str:
        return self.main_metric


CAUSAL_LM = LMTaskSpec(name="causal-lm", metrics=("nll", "perplexity"), main_metric="nll", higher_is_better=False,
                       kind="causal-lm")
MULTIPLE_CHOICE = LMTaskSpec(name="multiple-choice", metrics=("accuracy",), main_metric="accuracy",
                             higher_is_better=True, kind="multiple-choice")
LM_TASKS: dict[str, LMTaskSpec] = {spec.name: spec for spec in (CAUSAL_LM, MULTIPLE_CHOICE)}


def get_task(name: str, labels: Iterable[str] | None = None) -> TaskSpec | LMTaskSpec:
    """The spec of GLUE task `name` (case-insensitive; 'sst-2' and 'sts-b' are accepted too), of a
    task on the user's own data (`classification` with its class names, `labels`, once they are known),
    or of a decoder-LM task ('causal-lm', 'multiple-choice')."""
    if name.lower() in LM_TASKS:
        return LM_TASKS[name.lower()]
    if is_data_task(name):
        return data_task_spec(name.lower(), labels)
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise UserError(f"unknown task {name!r}: choose one of {', '.join((*TASKS, *DATA_TASKS, *LM_TASKS))}")
    return TASKS[key]
