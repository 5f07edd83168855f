"""The one place that knows each GLUE task: its files, text columns, labels and official metrics."""

from __future__ import annotations

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
    dev_splits: tuple[str, ...] = ("dev",)
    hub_dev_splits: tuple[str, ...] = ("validation",)

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
        TaskSpec("cola", "CoLA", False, 4, (3,), 1, ("sentence",), _BINARY,
                 ("matthews_correlation",), "matthews_correlation"),
        TaskSpec("sst2", "SST-2", True, None, ("sentence",), "label", ("sentence",), _BINARY,
                 ("accuracy",), "accuracy"),
        TaskSpec("mrpc", "MRPC", True, None, ("#1 String", "#2 String"), "Quality",
                 ("sentence1", "sentence2"), _BINARY, ("f1", "accuracy"), "f1"),
        TaskSpec("stsb", "STS-B", True, None, ("sentence1", "sentence2"), "score",
                 ("sentence1", "sentence2"), None, ("pearson", "spearmanr"), "pearson"),
        TaskSpec("qqp", "QQP", True, None, ("question1", "question2"), "is_duplicate",
                 ("question1", "question2"), _BINARY, ("f1", "accuracy"), "f1"),
        TaskSpec("mnli", "MNLI", True, None, ("sentence1", "sentence2"), "gold_label",
                 ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
                 ("accuracy",), "accuracy",
                 dev_splits=("dev_matched", "dev_mismatched"),
                 hub_dev_splits=("validation_matched", "validation_mismatched")),
        TaskSpec("qnli", "QNLI", True, None, ("question", "sentence"), "label",
                 ("question", "sentence"), _NLI2, ("accuracy",), "accuracy"),
        TaskSpec("rte", "RTE", True, None, ("sentence1", "sentence2"), "label",
                 ("sentence1", "sentence2"), _NLI2, ("accuracy",), "accuracy"),
        TaskSpec("wnli", "WNLI", True, None, ("sentence1", "sentence2"), "label",
                 ("sentence1", "sentence2"), _BINARY, ("accuracy",), "accuracy"),
    )
}


def get_task(name: str) -> TaskSpec:
    """The spec of GLUE task `name` (case-insensitive; 'sst-2' and 'sts-b' are accepted too)."""
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise UserError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return TASKS[key]
