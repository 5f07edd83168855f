"""`bayes-adalora export`: a finished run's adapter with a model card, or the model merged with it.

The adapter is the run's `adapter/` as peft wrote it, its safetensors metadata extended with what
peft's format does not say (method, criterion, rank budget, final total rank), with IVON's posterior
(`posterior.safetensors`, for IVON runs unless left out) and the run's settings and results
(`training_run.json`), so `evaluate --mc-samples` and `load_posterior_sigma` work from the folder alone.
With `merge`, the run's model is rebuilt as `evaluate` rebuilds it (`run_io.load_run_model`, stock peft),
every AdaLoRA update `P diag(lambda) Q` folded into its base weight (`merge_and_unload`), and saved as a
plain transformers model with the run's tokenizer. Either way `README.md` is the model card, with the
Hub's YAML front matter. Written into a temporary sibling folder and renamed: nothing is left half-written.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .adapters import POSTERIOR_FILE, damaged_file, read_posterior
from .config import config_fields, flag
from .errors import UserError
from .models import DEFAULT_MODEL_ID
from .paths import exists_at_all, partial_path
from .run_folder import EXPORT_CARD_LINE, EXPORT_RUN_FILE, check_output_folder, read_run, write_json, write_marker
from .run_io import load_run_model
from .tasks import is_data_task

METADATA_PREFIX = "bayes_adalora."
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "gpt2", "Qwen/Qwen2.5-0.5B"
GLUE_HUB_DATASET = "nyu-mll/glue"


def train_command(resolved: dict) -> str:
    """The `bayes-adalora train` command of a run's config.json: every setting that was given and differs
    from its default (those the run derived, such as its phases, it derives again)."""
    words = ["bayes-adalora", "train"]
    derived = set(resolved.get("derived", ()))
    for f in config_fields():
        value = resolved.get(f.name, f.default)
        unset = value in (f.default, [f.default], None)  # a list of choices holds its default as one item
        if f.name in ("resume_from_checkpoint", "overwrite") or f.name in derived or unset:
            continue
        if isinstance(value, bool):
            words.append(flag(f.name) if value else "--no-" + flag(f.name)[2:])
        elif isinstance(value, list):
            words += [flag(f.name), *map(str, value)]
        else:
            words += [flag(f.name), str(value)]
    return shlex.join(words)


def adapter_metadata(run) -> dict[str, str]:
    """What the adapter file records beyond peft's format (safetensors metadata: strings)."""
    config, results = run.config, run.results
    values = {"method": config.method, "criterion": results.get("criterion"), "task": run.resolved["task"],
              "base_model": run.resolved.get("model")}
    if config.uses_adalora:
        values.update(init_r=config.init_r, target_r=config.target_r, total_rank=results.get("total_rank"))
    return {METADATA_PREFIX + k: json.dumps(v) if not isinstance(v, str) else v for k, v in values.items()}


def base_model_id(resolved: dict) -> str | None:
    """The base model's id on the Hub where it is known: the packaged MiniLM's where the run took the default,
    a `--model` that names a Hub model rather than a folder; None for a local folder."""
    if "model" in resolved.get("derived", ()):
        return DEFAULT_MODEL_ID
    model = resolved.get("model")
    if not isinstance(model, str) or Path(model).exists() or not HUB_ID.fullmatch(model):
        return None
    return model


def card_metadata(run, merged: bool) -> dict:
    """The model card's YAML front matter, in the Hub's model-card keys: base model, library, task, tags,
    and the final dev metrics (with calibration, and the posterior predictive's where the run drew one)."""
    config, results, task, spec = run.config, run.results, run.resolved["task"], run.spec
    pipeline = "text-generation" if spec.peft_task_type == "CAUSAL_LM" else "text-classification"
    meta = {}
    base = base_model_id(run.resolved)
    if base is not None:
        meta["base_model"] = base
        meta["base_model_relation"] = "merge" if merged else "adapter"
    meta["library_name"] = "transformers" if merged else "peft"
    meta["pipeline_tag"] = pipeline
    meta["tags"] = ["bayes-adalora", config.method, *(["adalora"] if config.uses_adalora else []),
                    *(["ivon", "uncertainty"] if config.uses_ivon else [])]
    glue = not is_data_task(task) and spec.peft_task_type != "CAUSAL_LM"
    if glue:
        meta["datasets"] = [GLUE_HUB_DATASET]
    metrics = results.get("metrics", {})
    scored = [{"type": k, "value": v} for k, v in metrics.get("final", {}).items() if isinstance(v, (int, float))]
    draws = metrics.get("mc", {}).get("samples")
    scored += [{"type": k, "name": f"{k} (posterior predictive, {draws} draws)", "value": v}
               for k, v in metrics.get("mc", {}).items() if k != "samples" and isinstance(v, (int, float))]
    if scored:
        meta["metrics"] = sorted({m["type"] for m in scored})
        files = [Path(f).name for f in (run.resolved.get("validation_file"),) if f]
        dataset = ({"name": f"GLUE {task}", "type": GLUE_HUB_DATASET, "config": task, "split": "validation"} if glue
                   else {"name": files[0] if files else task, "type": task})
        meta["model-index"] = [{"name": run.folder.resolve().name,
                                "results": [{"task": {"type": pipeline}, "dataset": dataset, "metrics": scored}]}]
    return meta


def number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(run, merged: bool, with_posterior: bool = False) -> str:
    """README.md: what the exported model is, how it was trained, and how well it did."""
    config, results = run.config, run.results
    final = results.get("metrics", {}).get("final", {})
    rows = [f"| {k} | {number(v)} |" for k, v in final.items() if not isinstance(v, dict)]
    rows += [f"| {k} at coverage {c} | {number(v)} |" for k, sub in final.items() if isinstance(sub, dict)
             for c, v in sub.items()]
    ranks = results.get("final_ranks") or {}
    causal = run.spec.peft_task_type == "CAUSAL_LM"  # causal-lm and multiple-choice runs
    auto = "AutoModelForCausalLM" if causal else "AutoModelForSequenceClassification"
    lines = [
        "---",
        yaml.safe_dump(card_metadata(run, merged), sort_keys=False, allow_unicode=True).rstrip("\n"),
        "---",
        "",
        f"# {config.method} on {run.resolved['task']}",
        "",
        (f"A full model: the base model with the run's adapter merged into its weights (`merge_and_unload`); "
         f"load it with `{auto}.from_pretrained`." if merged else
         f"A peft adapter: `PeftModel.from_pretrained({auto}.from_pretrained(base"
         f"{'' if causal else ', num_labels=n'}), this_folder)`."),
        "",
        f"- base model: `{base_model_id(run.resolved) or run.resolved.get('model')}`",
        f"- task: {run.resolved['task']}",
        f"- method: {config.method}",
        f"- criterion: {results.get('criterion') or 'none (the method reads no posterior)'}",
    ]
    if config.uses_adalora:
        lines.append(f"- rank budget: init_r {config.init_r}, target_r {config.target_r} per matrix; "
                     f"final total rank {results.get('total_rank')} over {len(ranks)} matrices")
    lines += [f"- steps: {results.get('steps')}, seed {results.get('seed')}", "",
              EXPORT_CARD_LINE, "", "```", train_command(run.resolved),
              "```", "", "## Final dev metrics", "", "| metric | value |", "|---|---|", *rows]
    if with_posterior:
        lines += ["", "## Uncertainty", "",
                  f"`{POSTERIOR_FILE}` holds IVON's posterior over the adapter's weights (per weight: its mean, "
                  "Hessian and sigma). With this folder alone, `bayes-adalora evaluate THIS_FOLDER --mc-samples 16` "
                  "gives the posterior predictive's metrics, and in Python "
                  "`posterior_predictive(model, load_posterior_sigma(THIS_FOLDER, model), inputs)` "
                  "(both from `bayes_adalora`) its probabilities for a model loaded with `PeftModel.from_pretrained`."]
    if ranks:
        lines += ["", "## Final ranks", "", "| matrix | rank |", "|---|---|",
                  *(f"| {k} | {v} |" for k, v in ranks.items())]
    return "\n".join(lines) + "\n"


def export_run(run_dir: str | Path, output_dir: str | Path | None = None, merge: bool = False,
               with_posterior: bool | None = None) -> Path:
    """Export a finished run (see the module's docstring); returns the folder written.

    `with_posterior`: write IVON's `posterior.safetensors` beside the adapter; default on for IVON runs
    (not with `merge`: a merged model has no adapter weights for the posterior to describe).
    """
    run = read_run(run_dir)
    if run.exported:
        raise UserError(f"{run.folder} is already an export: export the run it came from")
    if with_posterior is None:
        with_posterior = run.config.uses_ivon and not merge
    if with_posterior and not run.config.uses_ivon:
        raise UserError(f"--with-posterior needs a run trained with IVON, and {run.folder} is a {run.method} run")
    if with_posterior and merge:
        raise UserError("--with-posterior and --merge do not go together: the posterior describes the adapter's "
                        "weights, which a merged model no longer has")
    posterior = run.folder / POSTERIOR_FILE
    if with_posterior:
        if not posterior.is_file():
            raise UserError(f"{run.folder} has no {POSTERIOR_FILE} to export (use --no-posterior to leave it out)")
        read_posterior(posterior, "sigma")  # a damaged file is refused before anything is written
    if run.config.method_spec.adapter is None:
        raise UserError(f"{run.folder} is a {run.method} run: its model/ folder is already the full model, "
                        f"there is no adapter to export")
    out = Path(output_dir) if output_dir is not None else run.folder / ("merged" if merge else "export")
    if exists_at_all(out):
        raise UserError(f"--output-dir {out} already exists: remove it or choose another folder")
    check_output_folder(out)  # not inside the run's own adapter/ or model/, and writable
    adapter = run.folder / "adapter"
    if not (adapter / "adapter_model.safetensors").is_file():
        raise UserError(f"{run.folder} holds no adapter (adapter/adapter_model.safetensors)")
    tmp = partial_path(out)
    made = [folder for folder in (out.parent, *out.parent.parents) if not folder.exists()]  # removed on failure
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        if merge:
            tokenizer, model = load_run_model(run, torch.device("cpu"))
            merged = model.merge_and_unload()
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        else:
            shutil.copytree(adapter, tmp)
            try:
                weights = load_file(tmp / "adapter_model.safetensors")
            except SafetensorError:
                raise damaged_file(adapter / "adapter_model.safetensors") from None
            save_file(weights, tmp / "adapter_model.safetensors", metadata={"format": "pt", **adapter_metadata(run)})
            write_json({"config": run.resolved, "results": run.results}, tmp / EXPORT_RUN_FILE)
            if with_posterior:
                shutil.copyfile(posterior, tmp / POSTERIOR_FILE)
        (tmp / "README.md").write_text(model_card(run, merge, with_posterior), encoding="utf-8")
        write_marker(tmp, "export")  # an --overwrite of the run removes its own old exports, and only those
        tmp.rename(out)
    except OSError as err:
        raise UserError(f"the export could not be written to {out} ({err.strerror or err})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not out.exists():  # the folders this export made for its output, deepest first, while empty
            for folder in made:
                try:
                    folder.rmdir()
                except OSError:
                    break
    return out


