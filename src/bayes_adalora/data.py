"""Reading GLUE data (standard TSV files, the user's own files, or the hub) and batching it.

Every reader returns a `TextDataset`: one tuple of 1 or 2 texts per example and its label as a
class index (float for regression). What a task's files look like comes from its `TaskSpec`; for
`--task classification` the spec itself comes from the training file's labels (`spec_from_labels`).
Mistakes in a file raise one `UserError` sentence naming the file and, where there is one, the
1-based line.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from .errors import UserError
from .paths import require_file, require_folder
from .tasks import TaskSpec, check_own_files, class_order, data_task_spec, get_task

HUB_DATASET = "nyu-mll/glue"


@dataclass
class TextDataset:
    """Examples of one split: `texts[i]` holds 1 or 2 strings, `labels[i]` their label."""

    texts: list[tuple[str, ...]]
    labels: list  # int class index, or float for regression
    source: str  # a file path, or e.g. "hub nyu-mll/glue sst2 validation"

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class TaskData:
    """A task's training data and its dev splits, keyed by `spec.dev_splits` names."""

    spec: TaskSpec
    train: TextDataset
    dev: dict[str, TextDataset]


# ----------------------------------------------------------------------------- shared helpers


def _read_text(path: Path) -> str:
    """The file's text, refusing missing, binary, non-UTF-8 and empty files."""
    require_file(path, "data file")
    raw = path.read_bytes()
    encoding = "utf-8-sig"  # -sig: MRPC's header starts with a BOM
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # what some editors save as "Unicode"
        encoding = "utf-16"
    elif b"\x00" in raw:
        raise UserError(f"{path} is not a text file (it holds NUL bytes)")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(f"{path}, line {line}: the file is not {encoding.upper().removesuffix('-SIG')} text; "
                        f"save it as UTF-8") from None
    if not text.strip():
        raise UserError(f"{path} has no examples (the file is empty)")
    return text


def read_rows(path: Path, delimiter: str, quoting: int) -> list[tuple[int, list[str]]]:
    """(1-based line number, fields) for every row, without trailing blank lines."""
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    rows = []
    try:
        for fields in reader:
            rows.append((reader.line_num, fields))
    except csv.Error as err:
        raise UserError(f"{path}, line {reader.line_num + 1}: the row cannot be read ({err})") from None
    while rows and not "".join(rows[-1][1]).strip():
        rows.pop()  # a blank last line is harmless
    return rows


def check_header(path: Path, header: list[str]) -> list[str]:
    """The header, refused if it names a column twice (the second would silently shadow the first)."""
    twice = next((c for i, c in enumerate(header) if c in header[:i]), None)
    if twice is not None:
        raise UserError(f"{path}, line 1: the header names the column {twice!r} twice; give each column its own name")
    return header


def column_index(path: Path, header: list[str], column: str) -> int:
    if column not in header:
        raise UserError(
            f"{path}, line 1: the header has no column {column!r} (it has {', '.join(map(repr, header))})")
    return header.index(column)


def _check_width(path: Path, line: int, fields: list[str], width: int, kind: str) -> None:
    if len(fields) != width:
        raise UserError(f"{path}, line {line}: expected {width} {kind} columns, found {len(fields)}")


def _as_int(value) -> int | None:
    """`value` as an int if it is one (an int, or a string of digits), else None."""
    if isinstance(value, bool):  # JSON true/false are not class indices
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdecimal():
        return int(value)
    return None


# the squared error of a larger label overflows float32 (3.4e38), and the loss is infinite at the first step
LARGEST_REGRESSION_LABEL = 1e18

# a number written with a decimal point or an exponent ("2.0", "0.5", "1e3"), as pandas writes a float column
_DECIMAL = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+(?=[eE]))([eE][+-]?\d+)?")


def normal_text(text: str) -> str:
    """The one normal form of the user's texts and labels: Unicode NFC, so that a letter typed as one code
    point or as a base and an accent (what macOS file names and some editors write) is the same text."""
    return unicodedata.normalize("NFC", text)


def reading_of(name: str) -> tuple:
    """What a class name reads as, to the eye: a number ("1", "01", "+1", "1.0" are 1) or its text without
    invisible format characters (zero-width spaces, BOMs) in compatibility form (NFKC: a full-width "Ａ" is "A")."""
    try:
        return ("number", float(name))
    except ValueError:
        pass
    shown = "".join(c for c in unicodedata.normalize("NFKC", name) if unicodedata.category(c) != "Cf")
    return ("text", shown.strip())


def check_class_spellings(classes: Sequence[str], where: str) -> None:
    """Refuse two class names that read the same ("1" and "01", "yes" and "yes" with a zero-width space)."""
    seen: dict[tuple, str] = {}
    for name in classes:
        other = seen.setdefault(reading_of(name), name)
        if other != name:
            raise UserError(f"{where}: the labels {other!r} and {name!r} read as the same "
                            f"{reading_of(name)[0]} but are spelled differently, so they would be two classes; "
                            f"write each class one way")


def label_name(value, where: str) -> str:
    """A class label of the user's own data as its name: text (stripped) or a whole number (3, "3", 3.0
    and "3.0" are the same class; a fraction, as a number or as text, is refused)."""
    if value is None:
        raise UserError(f"{where}: the label is missing")
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        value = float(value)  # a CSV's "2.0" is the class a JSON file's 2 is, and its "0.5" no class
    if isinstance(value, float) and value.is_integer():  # e.g. a Parquet column with nulls is float
        value = int(value)
    if isinstance(value, bool):  # a JSON or Parquet true/false column: as a CSV would spell it
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return normal_text(value.strip())
    if isinstance(value, str):
        raise UserError(f"{where}: the label is empty")
    raise UserError(f"{where}: label {value!r} is neither text nor a whole number; "
                    f"to predict numbers use --task regression")


def _shown(labels: Sequence[str], most: int = 10) -> str:
    return ", ".join(labels[:most]) + (f", ... ({len(labels)} classes)" if len(labels) > most else "")


def _parse_label(spec: TaskSpec, value, where: str, allow_index: bool):
    """`value` as a class index, or as a float for regression.

    Classification accepts the label strings of `spec.labels`; with `allow_index` also their
    integer indices, as the hub and the user's files may give them (not for the user's own classes,
    whose integers are names: `spec.from_data`).
    """
    if spec.from_data and spec.labels is not None:
        name = label_name(value, where)
        if name not in spec.labels:
            raise UserError(f"{where}: label {name!r} does not occur in the training data, "
                            f"whose classes are {_shown(spec.labels)}")
        return spec.labels.index(name)
    if spec.labels is None:
        try:
            number = math.nan if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise UserError(f"{where}: label {value!r} is not a number")
        if abs(number) > LARGEST_REGRESSION_LABEL:
            raise UserError(f"{where}: label {value!r} is too large to train on: training squares it in float32, "
                            f"which holds at most 3.4e38; rescale the labels (e.g. divide them by a power of 10)")
        low, high = spec.label_range
        if not low <= number <= high:
            raise UserError(f"{where}: label {value!r} lies outside {spec.name}'s range [{low:g}, {high:g}]")
        return number
    if isinstance(value, str) and value.strip() in spec.labels:
        return spec.labels.index(value.strip())
    index = _as_int(value) if allow_index else None
    if index is not None and 0 <= index < len(spec.labels):
        return index
    choices = ", ".join(spec.labels)
    if allow_index:
        choices += f" (or a class index 0 to {len(spec.labels) - 1})"
    raise UserError(f"{where}: label {value!r} is not one of {choices}")


# ----------------------------------------------------------------------------- GLUE TSV files


def read_glue_tsv(spec: TaskSpec, path: str | Path) -> TextDataset:
    """One split of `spec`'s task in the standard GLUE TSV layout.

    Read with quoting disabled, as the GLUE processors do: texts hold unbalanced quotes (RTE's
    train row 2164), which csv's default quoting would merge across columns.
    """
    path = Path(path)
    rows = read_rows(path, "\t", csv.QUOTE_NONE)
    if spec.tsv_has_header:
        header = check_header(path, rows[0][1]) if rows else []
        rows = rows[1:]
        width = spec.tsv_column_count or len(header)
        text_index = [column_index(path, header, c) for c in spec.tsv_text_columns]
        label_index = column_index(path, header, spec.tsv_label_column)
    else:  # headerless (CoLA): the spec gives 0-based positions
        width = spec.tsv_column_count
        text_index = list(spec.tsv_text_columns)
        label_index = spec.tsv_label_column
    if not rows:
        raise UserError(f"{path} has no examples")
    texts, labels = [], []
    for line, fields in rows:
        _check_width(path, line, fields, width, "tab-separated")
        texts.append(tuple(fields[i] for i in text_index))
        labels.append(_parse_label(spec, fields[label_index], f"{path}, line {line}", allow_index=False))
    return TextDataset(texts, labels, str(path))


# ----------------------------------------------------------------------------- the user's files


def _table_records(path: Path, delimiter: str, quoting: int,
                   columns: Sequence[str]) -> list[tuple[str, dict]]:
    """(where, row as a dict) for a CSV/TSV file whose first line names the columns."""
    rows = read_rows(path, delimiter, quoting)
    header = check_header(path, rows[0][1])
    for column in columns:
        column_index(path, header, column)
    kind = "tab-separated" if delimiter == "\t" else "comma-separated"
    records = []
    for line, fields in rows[1:]:
        _check_width(path, line, fields, len(header), kind)
        records.append((f"{path}, line {line}", dict(zip(header, fields))))
    return records


class KeyGivenTwice(dict):
    """A JSON object that gave a key more than once (`json` keeps the last silently): refused by the readers."""

    twice: str = ""


def _json_object(pairs: list[tuple[str, object]]) -> dict:
    """`json`'s object_pairs_hook: a dict, marked where a key came twice."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        obj = KeyGivenTwice(obj)
        obj.twice = next(k for k, _ in pairs if k in seen or seen.add(k))
    return obj


def _refuse_keys_twice(records: list[tuple[str, object]]) -> list[tuple[str, object]]:
    for where, record in records:
        if isinstance(record, KeyGivenTwice):
            raise UserError(f"{where}: the key {record.twice!r} is given twice, and JSON readers keep only one of "
                            f"them; give each key once")
    return records


def _json_records(path: Path) -> list[tuple[str, dict]]:
    """(where, object) for a .json file holding one list of objects, or one object per line (JSON
    Lines, what `datasets`' `Dataset.to_json` writes by default)."""
    try:
        items = json.loads(_read_text(path), object_pairs_hook=_json_object)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and _read_text(path).lstrip().startswith("{"):
            return _jsonl_records(path)
        raise UserError(f"{path}, line {err.lineno}: the JSON is malformed ({err.msg})") from None
    if not isinstance(items, list):
        raise UserError(f"{path} must hold a JSON list of objects, one per example")
    return _refuse_keys_twice([(f"{path}, item {i}", item) for i, item in enumerate(items, start=1)])


def _jsonl_records(path: Path) -> list[tuple[str, dict]]:
    """(where, object) for a .jsonl file: one JSON object per line, blank lines skipped."""
    records = []
    for line, text in enumerate(_read_text(path).splitlines(), start=1):
        if not text.strip():
            continue
        try:
            records.append((f"{path}, line {line}", json.loads(text, object_pairs_hook=_json_object)))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}, line {line}: the JSON is malformed ({err.msg})") from None
    return _refuse_keys_twice(records)


def _parquet_records(path: Path, columns: Sequence[str], optional: str | None = None) -> list[tuple[str, dict]]:
    """(where, row) for a Parquet file, read with pyarrow (what `datasets` reads Parquet with; its
    `from_parquet` would also write an Arrow copy into the cache, which reading one file needs not).
    The rows hold `columns`, and the column `optional` where the file has it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    require_file(path, "data file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{path} is not a readable Parquet file ({str(err).splitlines()[0]})") from None
    for column in columns:
        if column not in table.column_names:
            raise UserError(f"{path}: there is no column {column!r} (it has {', '.join(table.column_names)})")
    kept = [*columns, *([optional] if optional in table.column_names else [])]
    return [(f"{path}, row {i}", row) for i, row in enumerate(table.select(kept).to_pylist(), start=1)]


@dataclass
class UserRecords:
    """The rows of a user's file before its labels are parsed: (where, texts, raw label) each."""

    path: Path
    rows: list[tuple[str, tuple[str, ...], object]]
    labeled: bool = True  # False: the file has no label column, and every raw label is None


def read_user_records(path: str | Path, text_columns: Sequence[str], label_column: str,
                      labels_required: bool = True) -> UserRecords:
    """The texts and raw labels of the user's own .csv, .tsv, .json (a list of objects), .jsonl or
    .parquet file, every row checked to hold the columns, and text in the text columns.

    Without `labels_required`, a file with no label column at all is read as unlabeled (to predict).
    CSV uses standard quoting; TSV has quoting disabled, like the GLUE files.
    """
    path = Path(path)
    if not 1 <= len(text_columns) <= 2:
        raise UserError(f"give 1 or 2 text columns, not {len(text_columns)}")
    columns = (*text_columns, label_column)
    checked = columns if labels_required else tuple(text_columns)
    records = read_records(path, USER_FILE_TYPES, checked, optional=label_column)
    check_columns_apart(text_columns, label_column)  # after the file's own header is checked
    if not records:
        raise UserError(f"{path} has no examples")
    labeled = labels_required or any(isinstance(r, dict) and label_column in r for _, r in records)
    columns = columns if labeled else checked  # some rows labeled: all must be
    rows = []
    for where, record in records:
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object, found {type(record).__name__}")
        for column in columns:
            if column not in record:
                raise UserError(f"{where}: there is no column {column!r}")
        texts = tuple(record[c] for c in text_columns)
        for column, text in zip(text_columns, texts):
            if not isinstance(text, str):
                raise UserError(f"{where}: column {column!r} holds {text!r}, not text")
        rows.append((where, tuple(map(normal_text, texts)), record[label_column] if labeled else None))
    return UserRecords(path, rows, labeled)


def check_columns_apart(text_columns: Sequence[str], label_column: str) -> None:
    """Refuse a label column that is also a text column (the model would read its answer), and a text
    column named twice."""
    if label_column in text_columns:
        raise UserError(f"the label column {label_column!r} is also a text column: the model would read the "
                        f"answer it is to predict; choose other --text-columns or --label-column")
    if len(set(text_columns)) < len(text_columns):
        raise UserError(f"the text column {text_columns[0]!r} is named twice: give two different columns, or one")


def records_to_dataset(spec: TaskSpec, records: UserRecords) -> TextDataset:
    """The records' texts, and their labels parsed as `spec`'s class indices (regression: numbers)."""
    labels = [_parse_label(spec, label, where, allow_index=True) for where, _, label in records.rows]
    return TextDataset([texts for _, texts, _ in records.rows], labels, str(records.path))


def user_columns(spec: TaskSpec, text_columns: Sequence[str] | None,
                 label_column: str | None) -> tuple[tuple[str, ...], str]:
    """The text and label columns of the user's files: as given, else the hub's names for a GLUE task
    ("text" for the user's own tasks) and "label"."""
    return tuple(text_columns or spec.hub_text_columns), label_column or "label"


def read_user_file(spec: TaskSpec, path: str | Path, text_columns: Sequence[str] | None = None,
                   label_column: str | None = None) -> TextDataset:
    """The user's own .csv, .tsv, .json, .jsonl or .parquet file for task `spec` (`read_user_records`).

    `text_columns` (1 or 2 names) and `label_column` default as `user_columns` says. Labels may be
    the task's label strings or, for a GLUE task, their class indices (regression: a number).
    """
    return records_to_dataset(spec, read_user_records(path, *user_columns(spec, text_columns, label_column)))


def spec_from_labels(task: str, train: UserRecords, label_column: str) -> TaskSpec:
    """The spec of a task on the user's own data: for classification, the classes the training labels
    hold (in `tasks.class_order`), refusing a label column of one class."""
    if task == "regression":
        return data_task_spec(task)
    classes = class_order(label_name(label, where) for where, _, label in train.rows)
    check_class_spellings(classes, f"{train.path}, column {label_column!r}")
    if len(classes) < 2:
        raise UserError(f"{train.path}: every label in column {label_column!r} is {classes[0]!r}; "
                        f"classification needs at least two classes")
    return data_task_spec(task, classes)


USER_FILE_TYPES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
TABLE_FORMATS = {".csv": (",", csv.QUOTE_MINIMAL), ".tsv": ("\t", csv.QUOTE_NONE)}  # TSV unquoted, as GLUE's


def read_records(path: Path, kinds: Sequence[str] = (".csv", ".tsv", ".json", ".jsonl"), columns: Sequence[str] = (),
                 optional: str | None = None) -> list[tuple[str, dict]]:
    """(where, record) for every example of a file of one of the `kinds` allowed, chosen by its suffix: the
    one place that maps a suffix to its reader. A table's header (and a Parquet file's schema) must name
    `columns`; `optional` may be missing from a Parquet file; other checks are the caller's."""
    suffix = path.suffix.lower()
    if suffix not in kinds:
        raise UserError(f"{path}: unknown file type {suffix or '(none)'!r}; use {', '.join(kinds)}")
    if suffix in TABLE_FORMATS:
        return _table_records(path, *TABLE_FORMATS[suffix], columns)
    if suffix == ".parquet":
        return _parquet_records(path, columns, optional=optional)
    return _json_records(path) if suffix == ".json" else _jsonl_records(path)


# ----------------------------------------------------------------------------- the hub


def _hub_split(spec: TaskSpec, split, name: str) -> TextDataset:
    """A hub split (a `datasets.Dataset`) as a TextDataset."""
    source = f"hub {HUB_DATASET} {spec.name} {name}"
    columns = [list(split[c]) for c in spec.hub_text_columns]
    labels = [_parse_label(spec, v, source, allow_index=True) for v in split["label"]]
    return TextDataset(list(zip(*columns)), labels, source)


def load_hub(spec: TaskSpec) -> tuple[TextDataset, dict[str, TextDataset]]:
    """Train and dev splits of `spec` from the Hugging Face hub's GLUE (`nyu-mll/glue`).

    Dev splits come back under `spec.dev_splits` names ("validation" -> "dev").
    """
    import datasets  # slow to import; only the hub path needs it

    try:
        hub = datasets.load_dataset(HUB_DATASET, spec.name)
    except OSError as err:  # ConnectionError, hub HTTP and "not found offline" errors all are OSErrors
        raise UserError(
            f"the Hugging Face hub could not be reached to download GLUE {spec.name} "
            f"({type(err).__name__}); give a folder of GLUE TSV files with --data-dir or $GLUE_DIR"
        ) from None
    train = _hub_split(spec, hub["train"], "train")
    dev = {name: _hub_split(spec, hub[hub_name], hub_name)
           for name, hub_name in zip(spec.dev_splits, spec.hub_dev_splits)}
    return train, dev


# ----------------------------------------------------------------------------- choosing a source


def _task_dir(spec: TaskSpec, data_dir: Path) -> Path:
    """The folder holding the task's TSV files: `data_dir/<glue_dir>`, or `data_dir` itself."""
    require_folder(data_dir, "the GLUE data folder")
    for folder in (data_dir / spec.glue_dir, data_dir):
        if (folder / "train.tsv").is_file():
            return folder
    raise UserError(f"the GLUE data folder {data_dir} holds neither {spec.glue_dir}/train.tsv nor train.tsv")


def load_task_data(spec: TaskSpec | str, data_dir: str | Path | None = None,
                   train_file: str | Path | None = None, validation_file: str | Path | None = None,
                   text_columns: Sequence[str] | None = None,
                   label_column: str | None = None) -> TaskData:
    """The task's data from the user's files if given, else from `data_dir`, else from the hub.

    `spec` may be a task's name: `classification` then takes its classes from the training file
    (`spec_from_labels`), and the data's spec is `TaskData.spec`. A user's validation file becomes the
    first dev split (`spec.dev_splits[0]`). `text_columns`/`label_column` apply to the user's files only.
    """
    if (train_file is None) != (validation_file is None):
        raise UserError("give both a training file and a validation file, or neither")
    if isinstance(spec, str):
        check_own_files(spec, train_file, validation_file)
        spec = get_task(spec)  # classification: without its classes, read below
    if train_file is not None:
        text_columns, label_column = user_columns(spec, text_columns, label_column)
        train_records = read_user_records(train_file, text_columns, label_column)
        dev_records = read_user_records(validation_file, text_columns, label_column)
        if spec.from_data and not spec.labels and not spec.is_regression:
            spec = spec_from_labels(spec.name, train_records, label_column)
        dev = records_to_dataset(spec, dev_records)
        return TaskData(spec, records_to_dataset(spec, train_records), {spec.dev_splits[0]: dev})
    if text_columns or label_column:
        raise UserError("text and label column names apply only to your own training and validation files")
    if data_dir is not None:
        folder = _task_dir(spec, Path(data_dir))
        train = read_glue_tsv(spec, folder / "train.tsv")
        dev = {split: read_glue_tsv(spec, folder / f"{split}.tsv") for split in spec.dev_splits}
        return TaskData(spec, train, dev)
    train, dev = load_hub(spec)
    return TaskData(spec, train, dev)


def check_scorable(spec: TaskSpec, dataset: TextDataset) -> None:
    """Refuse regression dev data whose labels are all one value: Pearson's and Spearman's correlations with
    a constant are undefined, so no evaluation could be scored and no best step chosen."""
    if spec.is_regression and len(dataset) and len(set(dataset.labels)) == 1:
        raise UserError(f"{dataset.source}: every label is {dataset.labels[0]:g} in the {len(dataset)} examples "
                        f"evaluated, and the correlation of a constant is undefined; evaluate on examples with "
                        f"two or more different labels")


# ----------------------------------------------------------------------------- tokens and batches


def encode(dataset: TextDataset, tokenizer, max_length: int) -> list[dict]:
    """Token ids of each example (truncated to `max_length`, not padded) plus its "labels"."""
    if len(dataset) == 0:
        return []
    text_lists = [list(texts) for texts in zip(*dataset.texts)]  # one list per text position
    tokens = tokenizer(*text_lists, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in tokens]
    return [{**{k: tokens[k][i] for k in keys}, "labels": label}
            for i, label in enumerate(dataset.labels)]


class PadBatch:
    """Pads a batch to its longest example; labels become long (classes) or float (regression).

    A class rather than a closure so that DataLoader workers can pickle it.
    """

    def __init__(self, tokenizer):
        self.pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        key = next((k for k in ("labels", "label") if k in features[0]), None)  # datasets' own column is "label"
        batch = dict(self.pad([{k: v for k, v in f.items() if k not in ("labels", "label")} for f in features]))
        if key is not None:
            labels = [f[key] for f in features]
            dtype = torch.float32 if isinstance(labels[0], float) else torch.long
            batch["labels"] = torch.tensor(labels, dtype=dtype)
        return batch


def make_loader(encoded: Iterable[dict], tokenizer, batch_size: int, shuffle: bool,
                seed: int, min_last: int = 1, collate_fn=None) -> DataLoader:
    """Batches of `encoded`, padded per batch; with `shuffle`, the order is fixed by `seed`.

    Each pass over the loader draws a new order from the same seeded generator, so runs with
    the same seed see the same sequence of epochs. A last batch of fewer than `min_last`
    examples is dropped (a global batch shared by N processes needs at least N). `collate_fn` pads a
    batch (default: the classification padding above).
    """
    encoded = list(encoded)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    drop_last = 0 < len(encoded) % batch_size < min_last
    return DataLoader(encoded, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=collate_fn or PadBatch(tokenizer), drop_last=drop_last)
