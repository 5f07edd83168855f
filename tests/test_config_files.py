"""Settings from files, as Hugging Face's training scripts read them: `HfArgumentParser` with `TrainingArguments`
and `IVONArguments` from argv, a JSON file and a YAML file; `bayes-adalora train --config` from JSON or YAML."""

import json

import pytest
from transformers import HfArgumentParser, TrainingArguments

from bayes_adalora.cli import build_parser, main, read_config_file
from bayes_adalora.config import TrainConfig, make_config
from bayes_adalora.errors import UserError
from bayes_adalora.hf_trainer import IVONArguments

SETTINGS = {"output_dir": "runs/hf", "learning_rate": 30.0, "max_steps": 200, "method": "adalora-ivon",
            "init_r": 8, "target_r": 2, "ivon_ess": "auto", "ivon_beta2": 0.999, "ivon_hess_init": 0.1}
YAML = """\
output_dir: runs/hf
learning_rate: 30.0
max_steps: 200
method: adalora-ivon
init_r: 8
target_r: 2
ivon_ess: auto
ivon_beta2: 0.999
ivon_hess_init: 0.1
"""
ARGV = ["--output_dir", "runs/hf", "--learning_rate", "30", "--max_steps", "200", "--method", "adalora-ivon",
        "--init_r", "8", "--target_r", "2", "--ivon_ess", "auto", "--ivon_beta2", "0.999", "--ivon_hess_init", "0.1"]


def parsed(source: str, tmp_path):
    parser = HfArgumentParser((TrainingArguments, IVONArguments))
    if source == "argv":
        return parser.parse_args_into_dataclasses(ARGV)
    if source == "json":
        path = tmp_path / "args.json"
        path.write_text(json.dumps(SETTINGS))
        return parser.parse_json_file(str(path))
    path = tmp_path / "args.yaml"
    path.write_text(YAML)
    return parser.parse_yaml_file(str(path))


@pytest.mark.parametrize("source", ["argv", "json", "yaml"])
def test_hf_argument_parser_reads_training_and_ivon_arguments_from_argv_json_and_yaml(source, tmp_path):
    training, ivon = parsed(source, tmp_path)
    assert (training.output_dir, training.learning_rate, training.max_steps) == ("runs/hf", 30.0, 200)
    assert (ivon.method, ivon.init_r, ivon.target_r) == ("adalora-ivon", 8, 2)
    assert (ivon.ivon_ess, ivon.ivon_beta2, ivon.ivon_hess_init) == ("auto", 0.999, 0.1)
    assert ivon.criterion == IVONArguments().criterion  # not given: the default


@pytest.mark.parametrize("source", ["json", "yaml"])
def test_a_file_gets_the_same_checks_as_the_command_line(source, tmp_path):
    parser = HfArgumentParser((TrainingArguments, IVONArguments))
    path = tmp_path / f"args.{source}"
    bad = {**SETTINGS, "target_r": 8}  # the budget must fall: target_r below init_r
    path.write_text(json.dumps(bad) if source == "json" else YAML.replace("target_r: 2", "target_r: 8"))
    with pytest.raises(UserError, match="target-r"):
        parser.parse_json_file(str(path)) if source == "json" else parser.parse_yaml_file(str(path))
    path.write_text(json.dumps({**SETTINGS, "ivon_ess": "sometimes"}) if source == "json"
                    else YAML.replace("ivon_ess: auto", "ivon_ess: sometimes"))
    with pytest.raises(UserError, match=r"^--ivon-ess must be a number, auto or train-size, got .sometimes.$"):
        parser.parse_json_file(str(path)) if source == "json" else parser.parse_yaml_file(str(path))


def test_train_config_reads_a_yaml_file_as_it_reads_the_same_flags(tmp_path):
    path = tmp_path / "mrpc.yaml"
    path.write_text("task: mrpc\nmethod: bayes-adalora\nlearning_rate: 3e-1\nmax_steps: 400\n"
                    "target_modules: [query, value]\n"
                    "ivon_beta2: auto\nlora_dropout: 1e-1\n")
    from_file, _ = make_config({}, base=read_config_file(str(path)))
    flags = vars(build_parser().parse_args(["train", "--task", "mrpc", "--learning-rate", "0.3", "--max-steps", "400",
                                            "--target-modules", "query", "value", "--lora-dropout", "0.1"]))
    flags.pop("command")
    from_flags, _ = make_config(flags)
    assert from_file == from_flags
    assert (from_file.learning_rate, from_file.lora_dropout) == (0.3, 0.1)  # 3e-1 is a number, as in JSON


@pytest.mark.parametrize("text, words", [
    ("task: [mrpc\n", "is not a YAML file"),
    ("- task\n- mrpc\n", "must hold a YAML mapping of settings, not a list"),
    ("tsak: mrpc\n", "unknown setting 'tsak' (did you mean 'task'?)"),
    ("task: mrpc\nmax_steps: -3\n", "--max-steps"),
])
def test_a_bad_yaml_config_is_refused_in_one_sentence(text, words, tmp_path, capsys):
    path = tmp_path / "bad.yml"
    path.write_text(text)
    assert main(["train", "--config", str(path), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_a_json_config_still_reads_as_before(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"task": "rte", "max_steps": 50}))
    config, _ = make_config({}, base=read_config_file(str(path)))
    assert (config.task, config.max_steps) == ("rte", 50)
    path.write_text("task: rte\n")  # YAML text in a .json file is read as JSON, and refused
    with pytest.raises(UserError, match="is not a JSON file"):
        read_config_file(str(path))


def from_command_line(*argv: str):
    flags = vars(build_parser().parse_args(["train", *argv]))
    flags.pop("command")
    return make_config(flags)[0]


def test_the_flags_take_the_trainers_names_and_the_old_spellings_stay_aliases():
    new = from_command_line("--learning-rate", "0.3", "--num-train-epochs", "2", "--lr-scheduler-type", "cosine",
                            "--per-device-eval-batch-size", "8", "--resume-from-checkpoint",
                            "--report-to", "tensorboard", "wandb")
    old = from_command_line("--lr", "0.3", "--epochs", "2", "--lr-schedule", "cosine", "--eval-batch-size", "8",
                            "--resume", "--report-to", "tensorboard", "wandb")
    assert new == old
    assert (new.learning_rate, new.num_train_epochs, new.lr_scheduler_type, new.per_device_eval_batch_size,
            new.resume_from_checkpoint, new.report_to) == (0.3, 2.0, "cosine", 8, "latest", ["tensorboard", "wandb"])
    # the old constant schedule warmed up: its old spelling still does; transformers' constant does not
    assert from_command_line("--lr-schedule", "constant").lr_scheduler_type == "constant_with_warmup"
    assert from_command_line("--lr-scheduler-type", "constant").lr_scheduler_type == "constant"


def test_the_batch_is_set_once():
    with pytest.raises(UserError, match="--batch-size and --per-device-train-batch-size both set the batch"):
        from_command_line("--batch-size", "32", "--per-device-train-batch-size", "8")


def test_a_config_file_of_the_old_names_reads_as_the_new(tmp_path):
    """A run's config.json from before the renames: its settings, and what it derived, under the new names;
    its constant schedule, which warmed up, is transformers' constant_with_warmup."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"task": "rte", "lr": 0.05, "epochs": 2, "lr_schedule": "constant",
                                "eval_batch_size": 8, "warmup_steps": 3, "derived": ["model", "warmup_steps"]}))
    config, _ = make_config({}, base=read_config_file(str(path)))
    assert (config.learning_rate, config.num_train_epochs, config.lr_scheduler_type,
            config.per_device_eval_batch_size) == (0.05, 2, "constant_with_warmup", 8)
    assert config.warmup_steps is None  # derived there, so derived again
    path.write_text(json.dumps({"task": "rte", "lr": 0.05, "derived": ["lr"]}))
    assert make_config({}, base=read_config_file(str(path)))[0].learning_rate is None


def test_report_to_is_a_list_as_the_trainers_is():
    assert TrainConfig(report_to="tensorboard").report_to == ["tensorboard"]  # one name, as TrainingArguments takes
    assert TrainConfig().report_to == ["none"]
    with pytest.raises(UserError, match="none and all stand alone"):
        TrainConfig(report_to=["none", "wandb"])
    with pytest.raises(UserError, match="unknown report to 'comet'"):
        TrainConfig(report_to=["tensorboard", "comet"])
