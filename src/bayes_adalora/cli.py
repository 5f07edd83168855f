"""The `bayes-adalora` command: flags are generated from TrainConfig, so the CLI and the API agree."""

from __future__ import annotations

import argparse
import sys
import typing

from .config import TrainConfig, config_fields, make_config
from .errors import TrainingDiverged, UserError


def _flag_kwargs(field) -> dict:
    hint = typing.get_type_hints(TrainConfig)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = args[0]
    kwargs = {"help": field.metadata["help"], "default": argparse.SUPPRESS}
    for key in ("choices", "nargs", "const"):
        if key in field.metadata:
            kwargs[key] = field.metadata[key]
    if base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif "nargs" in kwargs:
        kwargs["type"] = base
    elif typing.get_origin(base) is list:
        kwargs.update(nargs="+", type=typing.get_args(base)[0], metavar="NAME")
    else:
        kwargs["type"] = base
    if field.default is not None and base is not bool:
        kwargs["help"] += f" [default: {field.default}]"
    return kwargs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayes-adalora",
        description="Bayesian adaptive low-rank fine-tuning: AdaLoRA ranks allocated from IVON's posterior.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune a model on a GLUE task and save the run",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field in config_fields():
        train.add_argument("--" + field.name.replace("_", "-"), dest=field.name, **_flag_kwargs(field))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    _quiet_libraries()
    try:
        if command == "train":
            from .train import train

            config, _ = make_config(args)
            results = train(config)
            print(_summary(results))
    except TrainingDiverged as exc:
        print(f"bayes-adalora: error: {exc}", file=sys.stderr)
        return 1
    except UserError as exc:
        print(f"bayes-adalora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bayes-adalora: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


def _summary(results: dict) -> str:
    final = ", ".join(f"{k} {v:.4f}" for k, v in results["metrics"]["final"].items())
    best = results["metrics"]["best"]
    best_main = best.get(results["main_metric"])
    return (
        f"{results['method']} on {results['task']}: final {final}; best {results['main_metric']} "
        f"{best_main:.4f} at step {best.get('step')}; {results['seconds_per_step']:.3f} s/step; "
        f"total rank {results['total_rank']}"
    )


def _quiet_libraries() -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*`r` is not used in AdaLora.*")
    # peft reads a deprecated transformers property on every run; nothing a user can act on
    warnings.filterwarnings("ignore", message=".*`is_gradient_checkpointing` is deprecated.*")
    # AdaLoRA may prune a matrix to rank 0; peft's save then warns of unsharded DeepSpeed tensors
    warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape.*")


if __name__ == "__main__":
    sys.exit(main())
