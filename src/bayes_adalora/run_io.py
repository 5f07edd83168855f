"""A saved run folder read back: its files, its model rebuilt exactly as trained, and `evaluate`.

The model is rebuilt the way training built it, with stock peft's classes (`build.build_adapter_model`,
AdaLoRA at its initial rank; training's fast path predicts through peft's own forward too) and the saved
adapter is loaded into it, pruned triplets coming back as zeros: the same shapes as in training, so the
same kernels and bitwise the same logits. Evaluation then runs
through `predict.predict` / `predict.predict_sampled`, the functions training used.
"""

from __future__ import annotations

import csv
import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import POSTERIOR_FILE, load_adapter_weights
from .build import build_adapter_model, on_device, resolve_device
from .config import check_field, config_fields, data_dir_of
from .data import (
    TextDataset,
    check_header,
    check_scorable,
    column_index,
    encode,
    load_task_data,
    make_loader,
    read_glue_tsv,
    read_rows,
    read_user_file,
    read_user_records,
    records_to_dataset,
    user_columns,
)
from .errors import UserError
from .evaluation import mc_predictive, point_predictive, predictive_metrics
from .kinds import task_kind
from .methods import get_method
from .models import default_model_path
from .paths import FOLDER, atomic_file, path_kind
from .predict import predict, predict_sampled
from .run_folder import SavedRun, check_new_file, read_run
from .tasks import LMTaskSpec, TaskSpec

# ----------------------------------------------------------------------------- the model


def load_run_model(run: SavedRun, device: torch.device):
    """(tokenizer, model) of the run, in eval mode on `device`, holding the weights the run ended with."""
    run.require("model", "total_steps")
    config, kind = run.config, task_kind(run.spec)
    if run.method == "full":
        if not (run.folder / "model").is_dir():
            raise UserError(f"{run.folder} holds no model/ folder: the fine-tuned model of this full run is missing")
        tokenizer, model, _ = kind.load_model(str(run.folder / "model"), config, device)
    else:
        adapter = run.adapter
        if not (adapter / "adapter_config.json").is_file() or not (adapter / "adapter_model.safetensors").is_file():
            where = "" if run.exported else "adapter/"
            raise UserError(
                f"{run.folder} holds no adapter ({where}adapter_config.json and {where}adapter_model.safetensors)"
            )
        tokenizer, base, fresh = kind.load_model(base_model_path(run), config, device)
        model = build_adapter_model(base, config, run.resolved["total_steps"], fresh)
        load_adapter_weights(model, adapter)
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise UserError(f"the weights saved in {run.folder} are not finite (NaN or inf): the run diverged; "
                        f"train it again with a lower --learning-rate")
    return tokenizer, on_device(model, device).eval()


def base_model_path(run: SavedRun) -> str:
    """What the run's base model loads from: its `model`, or, where the run took the default (the packaged
    MiniLM, at a path of the machine that trained it), the packaged MiniLM of this machine."""
    if "model" in run.resolved.get("derived", ()):
        return default_model_path()
    return run.resolved["model"]


def check_posterior(run: SavedRun) -> None:
    """Refuse MC sampling from a run that has no posterior to draw from."""
    if not get_method(run.method).uses_ivon:
        raise UserError(f"--mc-samples draws from IVON's posterior, and {run.folder} is a {run.method} run "
                        f"trained without one (use a bayes-adalora or adalora-ivon run)")
    if not (run.folder / POSTERIOR_FILE).is_file():
        raise UserError(f"{run.folder} has no posterior.safetensors: --mc-samples has no posterior to draw from")


def posterior_sigma_by_name(run: SavedRun, model) -> dict[str, torch.Tensor]:
    """The run's posterior sigma of every trained parameter of `model`, checked against it."""
    check_posterior(run)
    sigma = run.posterior("sigma")
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    wrong = sorted(n for n in trained if n not in sigma or sigma[n].shape != trained[n].shape)
    if wrong:
        raise UserError(f"{run.folder}/posterior.safetensors does not fit the run's model (no sigma for {wrong[0]})")
    return {n: sigma[n] for n in trained}


# ----------------------------------------------------------------------------- data


@dataclass
class EvalSplit:
    """Examples to evaluate: a dataset, the index of each example, and whether labels are known."""

    data: TextDataset
    index: list[str]
    labeled: bool = True


def glue_test_text_columns(spec: TaskSpec) -> tuple[str, ...]:
    """Text columns of the task's GLUE test.tsv: the TSV names, or the hub's where the TSV has no header (CoLA)."""
    return spec.tsv_text_columns if all(isinstance(c, str) for c in spec.tsv_text_columns) else spec.hub_text_columns


def read_glue_test_tsv(spec: TaskSpec, path: Path, rows: list) -> EvalSplit:
    """An unlabeled GLUE test file: an `index` (QQP: `id`) column and the task's text columns."""
    header = check_header(path, rows[0][1])
    index_column = next((c for c in ("index", "id") if c in header), None)
    columns = glue_test_text_columns(spec)
    missing = [c for c in columns if c not in header]
    if index_column is None or missing:
        raise UserError(
            f"{path} does not look like {spec.name} data: its header ({', '.join(header)}) has no "
            f"{repr(missing[0]) if missing else 'index'} column and no label column {spec.tsv_label_column!r}"
        )
    positions = [column_index(path, header, c) for c in columns]
    at = header.index(index_column)
    texts, index = [], []
    for line, fields in rows[1:]:
        if len(fields) != len(header):
            raise UserError(f"{path}, line {line}: expected {len(header)} tab-separated columns, found {len(fields)}")
        texts.append(tuple(fields[i] for i in positions))
        index.append(fields[at])
    if not texts:
        raise UserError(f"{path} has no examples")
    dummy = 0.0 if spec.is_regression else 0  # the loader wants a label; none is read
    return EvalSplit(TextDataset(texts, [dummy] * len(texts), str(path)), index, labeled=False)


def is_glue_layout(spec: TaskSpec, header: list[str], labeled: bool) -> bool:
    if not spec.tsv_has_header:  # CoLA: headerless train/dev, a test file with a header
        return len(header) == spec.tsv_column_count if labeled else header[:1] == ["index"]
    columns = spec.tsv_text_columns + ((spec.tsv_label_column,) if labeled else ())
    return all(c in header for c in columns)


def read_eval_file(spec: TaskSpec, path: Path, text_columns=None, label_column=None) -> EvalSplit:
    """A file to evaluate on: a GLUE TSV of the task (labeled, or an unlabeled test file), else the
    user's own .csv/.tsv/.json/.jsonl/.parquet with labels, read as training reads --validation-file
    (a run on the user's own data: also without a label column, to predict)."""
    if spec.from_data:
        records = read_user_records(path, *user_columns(spec, text_columns, label_column), labels_required=False)
        index = [str(i) for i in range(len(records.rows))]
        if records.labeled:
            return EvalSplit(records_to_dataset(spec, records), index)
        dummy = 0.0 if spec.is_regression else 0  # the loader wants a label; none is read
        texts = [texts for _, texts, _ in records.rows]
        return EvalSplit(TextDataset(texts, [dummy] * len(texts), str(path)), index, labeled=False)
    if path.suffix.lower() == ".tsv" and path.is_file():
        rows = read_rows(path, "\t", csv.QUOTE_NONE)
        header = check_header(path, rows[0][1]) if rows else []
        if is_glue_layout(spec, header, labeled=True):
            try:
                data = read_glue_tsv(spec, path)
            except UserError as glue_error:  # e.g. RTE with 0/1 labels, as the hub exports it:
                try:  # read it as training reads --validation-file, which takes class indices
                    data = read_user_file(spec, path, text_columns, label_column)
                except UserError:
                    raise glue_error from None
            return EvalSplit(data, [str(i) for i in range(len(data))])
        has_label = (label_column or spec.tsv_label_column) in header or "label" in header
        if not has_label and ("index" in header or "id" in header):
            return read_glue_test_tsv(spec, path, rows)
    data = read_user_file(spec, path, text_columns, label_column)
    return EvalSplit(data, [str(i) for i in range(len(data))])


def load_eval_data(run: SavedRun, data_dir: str | None, data_file: str | None, split: str | None,
                   max_eval_samples: int | None) -> dict[str, EvalSplit]:
    """What to evaluate, by split name: the run's own dev data (as it was, --max-eval-samples
    included), a split of another GLUE folder, or one file."""
    spec, config = run.spec, run.config
    if data_dir and data_file:
        raise UserError("give --data-dir or --data-file, not both")
    if data_file:
        if split:
            raise UserError("--split picks a file of a --data-dir folder; with --data-file the file is the split")
        # MNLI's dev_mismatched.tsv keeps its own name, so its metrics are not filed as "matched"
        name = Path(data_file).stem if Path(data_file).stem in spec.dev_splits else spec.dev_splits[0]
        splits = {name: read_eval_file(spec, Path(data_file), config.text_columns, config.label_column)}
    elif data_dir:
        if spec.from_data:
            raise UserError(f"--data-dir reads GLUE folders, and this is a {spec.name} run on your own data: "
                            f"give the file to evaluate with --data-file")
        folder = Path(data_dir)
        if not folder.is_dir():
            raise UserError(f"the GLUE data folder {folder} does not exist")
        folder = folder / spec.glue_dir if (folder / spec.glue_dir).is_dir() else folder
        names = [split] if split else list(spec.dev_splits)
        splits = {}
        for name in names:
            path = folder / f"{name}.tsv"
            if not path.is_file():
                raise UserError(f"{path} does not exist: --split names a file <SPLIT>.tsv of the task's GLUE folder")
            splits[name] = read_eval_file(spec, path)
    else:
        if split and split not in spec.dev_splits:
            raise UserError(f"the run's own data has the dev split(s) {', '.join(spec.dev_splits)}, not {split!r}")
        own = load_task_data(
            spec, data_dir=data_dir_of(config),
            train_file=config.train_file, validation_file=config.validation_file,
            text_columns=config.text_columns, label_column=config.label_column,
        )
        max_eval_samples = max_eval_samples or config.max_eval_samples
        splits = {name: EvalSplit(ds, [str(i) for i in range(len(ds))]) for name, ds in own.dev.items()
                  if split is None or name == split}
    if max_eval_samples:
        for s in splits.values():
            n = max_eval_samples
            s.data = dataclasses.replace(s.data, texts=s.data.texts[:n], labels=s.data.labels[:n])
            s.index = s.index[:max_eval_samples]
    for s in splits.values():
        if s.labeled:
            check_scorable(spec, s.data)
    return splits


# ----------------------------------------------------------------------------- evaluate


def check_predictions_path(path: Path) -> None:
    """Refuse, before any work, a predictions path that cannot be written or where something already is."""
    if path_kind(path) == FOLDER:
        raise UserError(f"--predictions {path} is a folder: give a file name")
    check_new_file(path, "--predictions")


def write_predictions(path: Path, spec: TaskSpec, splits: dict[str, EvalSplit], predictive: dict) -> None:
    """One row per example: index, prediction (the label string) and its probability, or the
    regression value; predictive_std with MC. Unlabeled GLUE test data: the submission format,
    `index<TAB>prediction`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    several = len(splits) > 1
    unlabeled = not spec.from_data and not all(s.labeled for s in splits.values())  # GLUE's submission format

    def label_of(value) -> str:
        return f"{float(value):.6f}" if spec.is_regression else spec.labels[int(value)]

    with atomic_file(path) as tmp:  # all rows or nothing
        write_prediction_rows(tmp, spec, splits, predictive, several, unlabeled, label_of)


def write_prediction_rows(path, spec, splits, predictive, several, unlabeled, label_of) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        if unlabeled:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(["index", "prediction"])
            for name, s in splits.items():
                writer.writerows([i, label_of(v)] for i, v in zip(s.index, predictive[name].predictions))
            return
        writer = csv.writer(f, lineterminator="\n")
        mc = any(p.std is not None for p in predictive.values())
        header = (["split"] if several else []) + ["index"]
        header += ["value"] if spec.is_regression else ["prediction", "probability"]
        writer.writerow(header + (["predictive_std"] if mc else []))
        for name, s in splits.items():
            p = predictive[name]
            columns = [p.predictions] if spec.is_regression else [[label_of(v) for v in p.predictions], p.confidence]
            columns += [p.std] if mc else []
            for i, row in enumerate(zip(*columns)):
                values = [
                    v if isinstance(v, str) else repr(float(v)) for v in row
                ]  # exact: re-reading gives the same numbers
                writer.writerow(([name] if several else []) + [s.index[i]] + values)


def evaluate_run(run_dir: str | Path, data_dir: str | None = None, data_file: str | None = None,
                 split: str | None = None, mc_samples: int = 0, predictions: str | None = None,
                 seed: int | None = None, device: str = "auto", max_eval_samples: int | None = None) -> dict:
    """Evaluate a saved run; returns {"run", "data", "examples", "metrics": {"point", "mc"?}, "predictions"?}.

    Point metrics are those of the posterior mean (the saved adapter), computed as `predict.evaluate` does,
    so the run's own dev data gives back results.json's final metrics exactly; with `mc_samples`
    K, the posterior predictive over K draws seeded by `seed` (default: the run's seed), as the
    run's own --mc-samples did.
    """
    fields = {f.name: f for f in config_fields()}  # the same ranges as train's flags of the same names
    for name, value in (("mc_samples", mc_samples), ("max_eval_samples", max_eval_samples), ("seed", seed)):
        if value is not None:
            check_field(fields[name], value)
    run = read_run(run_dir)
    resolve_device(device)  # a device this machine lacks is refused before any data or model is read
    if isinstance(run.spec, LMTaskSpec):
        return evaluate_lm_run(run, data_dir, data_file, split, mc_samples, predictions, seed, device, max_eval_samples)
    spec, config = run.spec, run.config
    if mc_samples:
        check_posterior(run)  # before any data or model is loaded
    if predictions:
        check_predictions_path(Path(predictions))
    splits = load_eval_data(run, data_dir, data_file, split, max_eval_samples)
    unlabeled = [s.data.source for s in splits.values() if not s.labeled]
    if unlabeled and not predictions:
        raise UserError(f"{unlabeled[0]} has no labels: pass --predictions FILE to write its predictions")

    device = resolve_device(device)
    tokenizer, model = load_run_model(run, device)
    sigma = posterior_sigma_by_name(run, model) if mc_samples else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if config.bf16 else nullcontext()
    loaders = {
        name: make_loader(
            encode(s.data, tokenizer, config.max_length), tokenizer, config.per_device_eval_batch_size, False,
            config.seed
        )
        for name, s in splits.items()
    }
    point = {}
    for name, loader in loaders.items():  # what predict.evaluate does, keeping the logits for the predictions file
        logits, labels = predict(model, loader, device, autocast)
        point[name] = (point_predictive(spec, logits.numpy()), labels.numpy())
    sampled = {}
    if mc_samples:
        draws = predict_sampled(model, loaders, device, autocast, sigma, mc_samples,
                                config.seed if seed is None else seed)
        sampled = {name: (mc_predictive(spec, d.numpy()), y.numpy()) for name, (d, y) in draws.items()}

    metrics = {"point": {}}
    for name, (p, y) in point.items():
        if splits[name].labeled:
            metrics["point"].update(predictive_metrics(spec, name, p, y))
    if sampled:
        metrics["mc"] = {}
        for name, (p, y) in sampled.items():
            if splits[name].labeled:
                metrics["mc"].update(predictive_metrics(spec, name, p, y))
        metrics["mc"]["samples"] = mc_samples
    out = {
        "run": str(run.folder), "task": spec.name, "method": run.method,
        "data": {name: s.data.source for name, s in splits.items()},
        "examples": {name: len(s.data) for name, s in splits.items()},
        "metrics": metrics,
    }
    if predictions:
        chosen = {name: (sampled or point)[name][0] for name in splits}
        write_predictions(Path(predictions), spec, splits, chosen)
        out["predictions"] = str(predictions)
    return out


def write_rows(path: Path, header: list[str], rows: list[list]) -> None:
    """A CSV of `rows` under `header`, all rows or nothing; numbers written exactly (repr)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([repr(v) if isinstance(v, float) else v for v in row] for row in rows)


def evaluate_lm_run(run: SavedRun, data_dir: str | None, data_file: str | None, split: str | None, mc_samples: int,
                    predictions: str | None, seed: int | None, device: str, max_eval_samples: int | None) -> dict:
    """`evaluate_run` for a causal-lm or multiple-choice run: its own validation file (cut as the run cut
    it) or `data_file`, through the functions training evaluated with."""
    kind, config = task_kind(run.spec), run.config
    if data_dir or split:
        raise UserError(f"a {run.spec.name} run reads no GLUE folder: evaluate another file with --data-file")
    if mc_samples:
        check_posterior(run)
    if predictions:
        check_predictions_path(Path(predictions))
    if data_file:
        dataset = kind.read_file(data_file)
        n = max_eval_samples
    else:
        dataset = kind.read_file(config.validation_file)
        n = max_eval_samples or config.max_eval_samples
    dataset = dataset.head(n or len(dataset))
    device = resolve_device(device)
    tokenizer, model = load_run_model(run, device)
    sigma = posterior_sigma_by_name(run, model) if mc_samples else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if config.bf16 else nullcontext()
    name = run.spec.dev_splits[0]
    loaders = {name: kind.dev_loader(dataset, tokenizer, config)}
    seed = config.seed if seed is None else seed
    metrics = {"point": kind.evaluate(model, loaders, device, autocast)}
    if mc_samples:
        metrics["mc"] = kind.evaluate_sampled(model, loaders, device, autocast, sigma, mc_samples, seed)
    out = {"run": str(run.folder), "task": run.spec.name, "method": run.method, "data": {name: dataset.source},
           "examples": {name: len(dataset)}, "metrics": metrics}
    if predictions:
        header, rows = kind.prediction_rows(model, loaders[name], dataset, device, autocast, sigma, mc_samples, seed)
        write_rows(Path(predictions), header, rows)
        out["predictions"] = str(predictions)
    return out
