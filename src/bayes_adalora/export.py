"""`bayes-adalora export`: a finished run's adapter with a model card, or the model merged with it.

The adapter is the run's `adapter/` as peft wrote it, its safetensors metadata extended with what
peft's format does not say (method, criterion, rank budget, final total rank). With `merge`, the run's
model is rebuilt as `evaluate` rebuilds it (`run_io.load_run_model`, stock peft), every AdaLoRA update
`P diag(lambda) Q` folded into its base weight (`merge_and_unload`), and saved as a plain transformers
model with the run's tokenizer. Either way `README.md` is the model card. Written into a temporary
sibling folder and renamed: nothing is left half-written.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .adapters import damaged_file
from .config import config_fields, flag
from .errors import UserError
from .paths import exists_at_all
from .run_folder import EXPORT_CARD_LINE, check_output_folder, read_run, write_marker
from .run_io import load_run_model

METADATA_PREFIX = "bayes_adalora."


def train_command(resolved: dict) -> str:
    """The `bayes-adalora train` command of a run's config.json: every setting that was given and differs
    from its default (those the run derived, such as its phases, it derives again)."""
    words = ["bayes-adalora", "train"]
    derived = set(resolved.get("derived", ()))
    for f in config_fields():
        value = resolved.get(f.name, f.default)
        if f.name in ("resume", "overwrite") or f.name in derived or value == f.default or value is None:
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


def number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(run, merged: bool) -> str:
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
        f"# {config.method} on {run.resolved['task']}",
        "",
        (f"A full model: the base model with the run's adapter merged into its weights (`merge_and_unload`); "
         f"load it with `{auto}.from_pretrained`." if merged else
         f"A peft adapter: `PeftModel.from_pretrained({auto}.from_pretrained(base"
         f"{'' if causal else ', num_labels=n'}), this_folder)`."),
        "",
        f"- base model: `{run.resolved.get('model')}`",
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
    if ranks:
        lines += ["", "## Final ranks", "", "| matrix | rank |", "|---|---|",
                  *(f"| {k} | {v} |" for k, v in ranks.items())]
    return "\n".join(lines) + "\n"


def export_run(run_dir: str | Path, output_dir: str | Path | None = None, merge: bool = False) -> Path:
    """Export a finished run (see the module's docstring); returns the folder written."""
    run = read_run(run_dir)
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
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
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
        (tmp / "README.md").write_text(model_card(run, merge), encoding="utf-8")
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


