"""The `bayes-adalora` command: flags are generated from TrainConfig, so the CLI and the API agree."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import gc
import json
import sys
import typing
import warnings
from pathlib import Path

from . import __version__
from .config import RunPlan, bounds_of, config_fields, current_names, field_type, flag, make_config
from .errors import TrainingDiverged, UserError
from .ivon_settings import NumberOrWord
from .paths import require_file


def flag_kwargs(field) -> dict:
    """argparse's keywords for a TrainConfig field: its type, help, choices and default shown."""
    base = field_type(field)
    # argparse formats help with %, so a literal "6%" must be doubled
    kwargs = {"help": field.metadata["help"].replace("%", "%%"), "default": argparse.SUPPRESS}
    for key in ("choices", "nargs", "const"):
        if key in field.metadata:
            kwargs[key] = field.metadata[key]
    if base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif getattr(bounds_of(field), "words", ()):
        kwargs.update(type=NumberOrWord, metavar="{" + ",".join((*bounds_of(field).words, "NUMBER")) + "}")
    elif "nargs" in kwargs:
        kwargs["type"] = base
    elif typing.get_origin(base) is list:
        kwargs.update(nargs="+", type=typing.get_args(base)[0], metavar="NAME")
    else:
        kwargs["type"] = base
    if field.default is not None and base is not bool:
        kwargs["help"] += f" [default: {field.default}]".replace("%", "%%")
    return kwargs


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (argparse prints the usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="bayes-adalora",
        description="Bayesian adaptive low-rank fine-tuning: AdaLoRA ranks allocated from IVON's posterior.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune a model (a GLUE task, your own labelled files, a causal LM "
                                "or multiple choice) and save the run",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field in config_fields():
        train.add_argument("--" + field.name.replace("_", "-"), dest=field.name, **flag_kwargs(field))
        for alias in field.metadata.get("aliases", ()):  # the old spelling, read under the old name (RENAMED)
            old = alias.removeprefix("--").replace("-", "_")
            train.add_argument(alias, dest=old, **{**flag_kwargs(field), "help": f"old spelling of {flag(field.name)}"})
    train.add_argument("--config", dest="config_file", metavar="FILE", default=argparse.SUPPRESS,
                       help="Start from a settings file: a run's config.json, or a JSON or YAML file (.yaml, .yml) "
                            "of settings named as in config.json; flags given here win.")

    evaluate = commands.add_parser(
        "evaluate", help="evaluate a saved run: point and posterior-predictive metrics, predictions",
        description="Evaluate a saved run folder. Without --data-dir or --data-file: the run's own dev data, "
                    "which gives back results.json's final metrics exactly. Prints the metrics as JSON.",
    )
    evaluate.add_argument("run_dir", metavar="RUN_DIR",
                          help="a folder written by `bayes-adalora train`, or an adapter `bayes-adalora export` wrote")
    evaluate.add_argument("--data-dir", help="another GLUE folder (<TASK>/<SPLIT>.tsv or <SPLIT>.tsv)")
    evaluate.add_argument("--data-file", help="one file: a GLUE TSV of the task (an unlabeled test.tsv too), "
                                              "or .csv .tsv .json .jsonl as for --validation-file")
    evaluate.add_argument("--split", help="with --data-dir: the file <SPLIT>.tsv, e.g. test "
                                          "[default: the task's dev split(s)]")
    evaluate.add_argument(
        "--mc-samples",
        type=int,
        default=0,
        metavar="K",
        help="also the posterior predictive over K draws from IVON's posterior (IVON runs) [default: 0]",
    )
    evaluate.add_argument("--predictions", metavar="FILE",
                          help="write one row per example (CSV: index, prediction, probability or value, "
                               "predictive_std with MC); unlabeled GLUE test data: the GLUE submission TSV")
    evaluate.add_argument(
        "--max-eval-samples",
        type=int,
        metavar="N",
        help="only the first N examples of each split [default: the run's for its own data, else all]",
    )
    evaluate.add_argument("--seed", type=int, help="seed of the posterior draws [default: the run's seed]")
    evaluate.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto [default: auto]")

    export = commands.add_parser(
        "export", help="write a run's adapter with a model card, or with --merge the full model merged with it")
    export.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `bayes-adalora train`")
    export.add_argument("--merge", action="store_true",
                        help="fold the adapter into the base weights and write a plain transformers model")
    export.add_argument("--output-dir", help="a new folder [default: RUN_DIR/export, or RUN_DIR/merged with --merge]")
    export.add_argument("--with-posterior", action="store_true", default=None,
                        help="write IVON's posterior.safetensors beside the adapter, so that evaluate --mc-samples "
                             "and load_posterior_sigma work from the exported folder alone [default for IVON runs "
                             "without --merge]")
    export.add_argument("--no-posterior", dest="with_posterior", action="store_false",
                        help="leave the posterior out")

    plot = commands.add_parser("plot", help="write a run's PNG figures (ranks, training curves, sigma, correlations)")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `bayes-adalora train`")
    plot.add_argument("--output-dir", help="where the PNGs go [default: RUN_DIR]")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = vars(parser.parse_args(argv))
    except SystemExit as done:  # --help (0), or a flag argparse refused (2): its line is printed
        return done.code
    command = args.pop("command")
    opened_before = processes_started()  # a group the caller opened stays open
    quiet_libraries()
    try:
        if command == "train":
            config, _ = make_config(args, base=read_config_file(args.pop("config_file", None)))
            # deferred until the settings are checked: neither `--help` nor a refused flag should wait
            # for peft and the training code to load (about 7 s on 2 CPU cores)
            from .plots import plot_run
            from .train import train

            results = train(config, figures=plot_run)
            print(summary(results))
        elif command == "evaluate":
            from .run_folder import finite_or_none
            from .run_io import evaluate_run

            print(json.dumps(finite_or_none(evaluate_run(**args)), indent=2))
        elif command == "export":
            from .export import export_run

            print(export_run(args["run_dir"], args["output_dir"], args["merge"], args["with_posterior"]))
        elif command == "plot":
            from .plots import plot_run

            for path in plot_run(args["run_dir"], args["output_dir"]):
                print(path)
    except TrainingDiverged as exc:
        print(f"bayes-adalora: error: {exc}", file=sys.stderr)
        return 1
    except UserError as exc:
        print(f"bayes-adalora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bayes-adalora: interrupted: the run was not written (checkpoints saved by --save-steps are kept: "
              "continue with --resume-from-checkpoint, or start again with --overwrite)", file=sys.stderr)
        return 130
    finally:
        if not opened_before:
            close_processes()
    return 0


def processes_started() -> bool:
    """Whether a torch.distributed process group is open (torch not imported: none is)."""
    distributed = sys.modules.get("torch.distributed")  # never imported by --help or a refused flag
    return distributed is not None and distributed.is_available() and distributed.is_initialized()


def close_processes() -> None:
    """Closes the process group the command opened (the Trainer's, under torchrun), once what held it (the run's
    DDP model) is collected: left to the interpreter's exit, a gloo process can abort ("terminate called without
    an active exception") after its run was written, as gloo's threads still hold tensors then. accelerate's
    state, which describes the group, is reset with it."""
    if processes_started():
        gc.collect()
        sys.modules["torch.distributed"].destroy_process_group()
        accelerate_state = sys.modules.get("accelerate.state")
        reset = getattr(getattr(accelerate_state, "AcceleratorState", None), "_reset_state", None)
        if reset is not None:
            reset(reset_partial_state=True)


def read_config_file(path: str | None) -> dict | None:
    """The settings of a --config file: a run's config.json, or any JSON or YAML object of TrainConfig fields
    (the plan's keys a run's config.json adds, such as total_steps, are left out, and so are
    --resume-from-checkpoint and --overwrite; any other key is refused, naming the setting it may misspell)."""
    if path is None:
        return None
    file = Path(path)
    require_file(file, "--config")
    yaml_file = file.suffix.lower() in (".yaml", ".yml")
    try:
        text = file.read_text(encoding="utf-8")
        values = read_yaml(text) if yaml_file else json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"--config {file} is not a {'YAML' if yaml_file else 'JSON'} file ({err})") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {file} must hold a {'YAML mapping' if yaml_file else 'JSON object'} of settings, "
                        f"not a {type(values).__name__}")
    values = current_names(values)
    fields = {f.name for f in config_fields()}
    known = fields | {f.name for f in dataclasses.fields(RunPlan)} | {"derived"}  # a run's config.json holds its plan
    unknown = sorted(set(values) - known)
    if unknown:  # a misspelled key would otherwise leave its setting at the default, unsaid
        near = difflib.get_close_matches(unknown[0], sorted(fields), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise UserError(f"--config {file}: unknown setting {unknown[0]!r}{hint}; a config file holds TrainConfig's "
                        f"settings as a run's config.json names them")
    names = fields - {"resume_from_checkpoint", "overwrite"}  # how to run, not what: give them anew
    names.add("derived")  # what the run derived, make_config derives again
    return {k: v for k, v in values.items() if k in names}


def read_yaml(text: str):
    """A YAML document as Python values, with numbers such as `3e-5` read as numbers (YAML 1.1, which PyYAML
    follows, needs a dot in a float: `3.0e-5`; JSON and the command line take both)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    exponent = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", exponent, list("-+0123456789."))
    try:
        return yaml.load(text, Loader=Loader)  # a SafeLoader: no Python objects are built
    except yaml.YAMLError as err:
        raise ValueError(str(err).replace("\n", " ")) from None


def numbers(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def summary(results: dict) -> str:
    final = numbers(results["metrics"]["final"])
    if "mc" in results["metrics"]:
        final += (
            f"; posterior predictive ({results['metrics']['mc']['samples']} draws) {numbers(results['metrics']['mc'])}"
        )
    best = results["metrics"]["best"]
    best_main = best.get(results["main_metric"])
    return (
        f"{results['method']} on {results['task']}: final {final}; best {results['main_metric']} "
        f"{best_main:.4f} at step {best.get('step')}; {results['seconds_per_step']:.3f} s/step; "
        f"total rank {results['total_rank']}"
    )


def quiet_libraries() -> None:
    """Silence library messages a user cannot act on (shared with the benchmarks)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*`r` is not used in AdaLora.*")
    # peft reads a deprecated transformers property on every run; nothing a user can act on
    warnings.filterwarnings("ignore", message=".*`is_gradient_checkpointing` is deprecated.*")
    # AdaLoRA may prune a matrix to rank 0; peft's save then warns of unsharded DeepSpeed tensors
    warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape.*")
    # peft's AdaLoRA keys its rank pattern by parameter name; a generic check of peft's compares them with
    # module names when an adapter loads (README: Output files)
    warnings.filterwarnings("ignore", message=".*rank_pattern keys did not match any targeted module.*")


if __name__ == "__main__":
    sys.exit(main())
