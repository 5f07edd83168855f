"""The run configuration: one dataclass whose fields carry their help text and their allowed values,
serving the CLI and the API, valid by construction; and the run plan resolved from it once.

A field says what it accepts: `choices` in its metadata, or for a number its bounds (finite always; an
integer where the field is an int), declared with the field and kept beside it (`bounds_of`): the metadata
holds only keys argparse takes, so transformers' `HfArgumentParser` reads the dataclasses built on these
fields. `TrainConfig.__post_init__` checks every field against it and the
fields against each other, so a config that exists is valid, whether built by the CLI or in Python.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field

from .errors import UserError
from .importance import DEFAULT_CRITERION, POSTERIOR_CRITERIA
from .ivon_settings import AUTO, TRAIN_SIZE, resolve_beta2, resolve_ess
from .methods import METHOD_NAMES, get_method
from .recipes import paper_recipe
from .schedules import default_adalora_phases
from .tasks import TaskSpec, check_own_files, get_task

# transformers' schedules that need nothing beyond the warm-up and the step count, and the paper's two-phase
LR_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                "inverse_sqrt", "two-phase")
LAMBDA_INITS = ("zero", "paper")
FSDP_MODES = ("full_shard", "shard_grad_op")  # transformers' names of FSDP's sharding strategies
REPORT_TO = ("none", "all", "tensorboard", "wandb", "mlflow")
SEED_MAX = 2**32 - 1  # NumPy's seed range
DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


@dataclass(frozen=True)
class Bounds:
    """The numbers a field accepts: an interval, plus one `off` value outside it (e.g. 0: off)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    off: float | None = None
    why: str = ""  # said after the refusal
    words: tuple[str, ...] = ()  # besides numbers, the field takes these words (e.g. "auto"), resolved by the plan

    def contains(self, value: float) -> bool:
        if self.off is not None and value == self.off:
            return True
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def phrase(self, integer: bool) -> str:
        """What the value must do, e.g. "be positive", "lie in (0, 1)", "be 0 (off) or at least 1"."""
        open_ended = self.high == math.inf and not self.low_open
        if self.off is not None and open_ended:
            core = "positive" if integer and self.low == 1 else f"at least {self.low:g}"
            return f"be {self.off:g} (off) or {core}"
        if integer and open_ended and self.low in (0, 1):
            return "be positive" if self.low == 1 else "be 0 or more"
        high = str(int(self.high)) if integer and self.high != math.inf else f"{self.high:g}"
        right = ")" if self.high_open or self.high == math.inf else "]"
        return f"lie in {'(' if self.low_open else '['}{self.low:g}, {high}{right}"


POSITIVE = Bounds(low=1)  # for int fields: 1, 2, ...
NON_NEGATIVE = Bounds(low=0)
POSITIVE_REAL = Bounds(low=0, low_open=True)
UNIT_OPEN = Bounds(low=0, high=1, low_open=True, high_open=True)
UNIT_RIGHT_OPEN = Bounds(low=0, high=1, high_open=True)


_BOUNDS_OF_FIELD: dict[int, Bounds] = {}  # id of a field object -> its bounds, named in FIELD_BOUNDS below


def _f(default, help: str, bounds: Bounds | None = None, **kw):
    """A field with its help (and argparse's `choices`) as metadata; its bounds kept beside it."""
    made = field(default=default, metadata={"help": help, **kw})
    if bounds is not None:
        _BOUNDS_OF_FIELD[id(made)] = bounds
    return made


@dataclass
class TrainConfig:
    """Every setting of a training run, checked on creation (a `UserError` naming the flag): the command
    line's flags are generated from these fields, so each field is the flag of the same name with dashes
    (`max_steps` is `--max-steps`); the command-line reference lists them with their help and defaults."""

    # what to train
    task: str = _f("sst2", "GLUE task (cola sst2 mrpc stsb qqp mnli qnli rte wnli), classification / regression "
                           "on your own --train-file and --validation-file, or, for a decoder LM, causal-lm or "
                           "multiple-choice (your own files too).")
    method: str = _f("bayes-adalora", "Fine-tuning method.", choices=METHOD_NAMES)
    criterion: str = _f(
        DEFAULT_CRITERION, "Posterior importance criterion (bayes-adalora only).", choices=POSTERIOR_CRITERIA
    )
    model: str | None = _f(None, "HF model name or path; default: the packaged all-MiniLM-L6-v2 (offline).")
    target_modules: list[str] | None = _f(None, "Module-name suffixes to adapt; default: the architecture's preset.")
    trust_remote_code: bool = _f(False, "Allow model code from the hub (off unless asked for).")
    # data
    data_dir: str | None = _f(None, "Folder of GLUE TSVs (<TASK>/train.tsv, dev.tsv); default $GLUE_DIR, else the hub.")
    train_file: str | None = _f(None, "Your own training data (.csv .tsv .json .jsonl .parquet).")
    validation_file: str | None = _f(None, "Your own validation data (same format as --train-file).")
    text_columns: list[str] | None = _f(None, "Text column(s) in --train-file: one or two, as A B or A,B; a name "
                                              "holding a comma quoted as in CSV, '\"A, B\"' "
                                              "(default: the GLUE task's, or text).")
    label_column: str | None = _f(None, "Label column in --train-file (default: label).")
    max_length: int = _f(128, "Truncate inputs to this many tokens (padding is per batch).", bounds=POSITIVE)
    max_train_samples: int | None = _f(None, "Use only the first N training examples.", bounds=POSITIVE)
    max_eval_samples: int | None = _f(None, "Use only the first N examples of each dev split.", bounds=POSITIVE)
    # schedule
    batch_size: int = _f(32, "Training batch size: the examples of one optimizer step, over all processes and "
                              "micro-batches.", bounds=POSITIVE)
    per_device_train_batch_size: int | None = _f(
        None, "Instead of --batch-size: the examples each process runs forward at once, as the Trainer counts them "
              "(the batch is this x the processes x --gradient-accumulation-steps).", bounds=POSITIVE)
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step: each process runs its share of "
                                             "--batch-size forward and backward in this many parts, in turn (the "
                                             "memory of a smaller batch, the gradient of the whole).",
                                          bounds=POSITIVE)
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass instead of keeping them: "
                                             "less memory, about a third more compute.")
    per_device_eval_batch_size: int = _f(128, "Evaluation batch size (each process evaluates every dev example).",
                                         bounds=POSITIVE, aliases=["--eval-batch-size"])
    max_steps: int | None = _f(None, "Number of optimizer steps (wins over --num-train-epochs).", bounds=POSITIVE)
    num_train_epochs: float = _f(
        3.0, "Number of passes over the training data, when --max-steps is not given.", bounds=POSITIVE_REAL,
        aliases=["--epochs"],
    )
    learning_rate: float | None = _f(
        None,
        "Peak learning rate; default per optimizer: IVON 3.0 / --ivon-hess-init (its step is lr x hess_init x "
        "a clipped Newton-like ratio), AdaLoRA 2e-3, LoRA 1e-3, full 3e-5.",
        bounds=Bounds(low=0, high=1e6, low_open=True),  # above, AdamW's float32 step overflows (1e39 crashed)
        aliases=["--lr"],
    )
    lr_scheduler_type: str = _f(
        "linear",
        "The learning-rate schedule: transformers' (after --warmup-steps' linear warm-up, but constant, which has "
        "none: constant_with_warmup has it), or the paper's two-phase IVON schedule.",
        choices=LR_SCHEDULES, aliases=["--lr-schedule"],
    )
    warmup_steps: int | None = _f(None, "Learning-rate warm-up steps (default: 6% of the run).", bounds=NON_NEGATIVE)
    two_phase_first: float = _f(2.0, "two-phase: multiplier reached after warm-up and held until --two-phase-const.",
                                bounds=NON_NEGATIVE)
    two_phase_second: float = _f(0.4, "two-phase: multiplier that then falls linearly to 0.", bounds=NON_NEGATIVE)
    two_phase_const: int = _f(500, "two-phase: last step at the first multiplier.", bounds=NON_NEGATIVE)
    weight_decay: float = _f(0.0, "AdamW weight decay.", bounds=NON_NEGATIVE)
    eval_steps: int | None = _f(
        None, "Evaluate every N steps (default: a tenth of the run's steps, at least 1), at each epoch's end and at "
              "the end.", bounds=POSITIVE
    )
    seed: int = _f(0, "Random seed (same seed, same result on the CPU).", bounds=Bounds(low=0, high=SEED_MAX))
    # adapters
    init_r: int = _f(6, "AdaLoRA initial rank per matrix.", bounds=POSITIVE)
    target_r: int = _f(4, "AdaLoRA final average rank per matrix.", bounds=POSITIVE)
    tinit: int | None = _f(
        None, "AdaLoRA steps at the initial budget (default: 15% of the run, as in the paper).", bounds=NON_NEGATIVE
    )
    tfinal: int | None = _f(
        None, "AdaLoRA final steps at the fixed pattern (default: 45% of the run, as in the paper).",
        bounds=NON_NEGATIVE,
    )
    delta_t: int | None = _f(
        None, "AdaLoRA steps between maskings (default: ~200 maskings in the fall, every step in a short run).",
        bounds=POSITIVE,
    )
    lambda_init: str = _f("zero", "AdaLoRA's initial lambda: zero (peft >= 0.12) or paper (N(0, 0.02), as peft 0.11 "
                                  "in the paper's runs).", choices=LAMBDA_INITS)
    orth_reg: float = _f(0.1, "AdaLoRA orthogonality penalty weight.", bounds=NON_NEGATIVE)
    sensitivity_beta1: float = _f(0.85, "AdaLoRA sensitivity EMA (adalora, adalora-ivon).", bounds=UNIT_OPEN)
    sensitivity_beta2: float = _f(0.85, "AdaLoRA uncertainty EMA (adalora, adalora-ivon).", bounds=UNIT_OPEN)
    lora_r: int = _f(4, "LoRA rank (method lora).", bounds=POSITIVE)
    lora_alpha: float = _f(32.0, "LoRA/AdaLoRA alpha (update scale).", bounds=POSITIVE_REAL)
    lora_dropout: float = _f(0.0, "Dropout on the adapter input.", bounds=UNIT_RIGHT_OPEN)
    # IVON
    ivon_ess: float | str | None = _f(
        AUTO, "IVON effective sample size. auto: the training-set size, or 10 x the trainable parameters where "
              "that is larger (the noise of IVON's draws then costs at most about 0.05 nats of training loss); "
              "train-size: the training-set size (the paper's).",
        bounds=dataclasses.replace(POSITIVE_REAL, words=(AUTO, TRAIN_SIZE)),
    )
    ivon_hess_init: float = _f(
        0.1, "IVON initial Hessian (the paper's: 1). Below 1 the data outweigh it sooner, so sigma varies earlier; "
             "the default lr follows it (3 / this).", bounds=POSITIVE_REAL)
    ivon_beta1: float = _f(0.9, "IVON momentum.", bounds=UNIT_RIGHT_OPEN)
    ivon_beta2: float | str = _f(AUTO, "IVON Hessian EMA. auto: 1 - 10/steps, a horizon of a tenth of the run, so "
                                       "the posterior learns within it (the paper's: 0.99999).",
                                bounds=dataclasses.replace(UNIT_RIGHT_OPEN, words=(AUTO,)))
    ivon_weight_decay: float = _f(1e-8, "IVON weight decay (prior precision per example).", bounds=NON_NEGATIVE)
    ivon_clip_radius: float = _f(1e-3, "IVON elementwise update clip.", bounds=POSITIVE_REAL)
    train_mc_samples: int = _f(1, "IVON posterior samples per training step.", bounds=POSITIVE)
    mc_samples: int = _f(
        0,
        "Posterior predictive at the final evaluation: average over K draws from IVON's posterior (0: off).",
        bounds=Bounds(low=1, off=0),
    )
    log_correlations: bool | None = _f(
        None,
        "Log Spearman correlations of sensitivity and posterior triplet scores at "
        "each allocation step to correlations.json (default: on for IVON methods).",
    )
    plots: bool = _f(True, "Write PNG plots of the run into the output folder at the end.")
    report_to: list[str] = _f("none", "Log loss, lr, rank budget, the main metric and IVON's sigma statistics to "
                                      "trackers: tensorboard (into OUTPUT_DIR/tensorboard), wandb, mlflow, several, "
                                      "all (those installed) or none.", choices=REPORT_TO)
    logging_steps: int = _f(1, "Log to the trackers every N steps: the mean loss over those steps, the lr, the rank "
                               "budget (history.json keeps every step).", bounds=POSITIVE)
    # running
    output_dir: str = _f("runs/latest", "Where results.json, adapter/, posterior.safetensors and config.json go.")
    divergence_factor: float = _f(
        100.0,
        "Stop when the loss exceeds this many times the first step's (0: only NaN/inf stops).",
        bounds=Bounds(low=1, off=0, why="a smaller factor stops any run at its first step"),
    )
    save_steps: int | None = _f(None, "Write a checkpoint (for --resume-from-checkpoint) every N steps into "
                                      "OUTPUT_DIR/checkpoints.",
                                bounds=POSITIVE)
    save_total_limit: int = _f(2, "Checkpoints kept, the latest ones (0 keeps all).", bounds=NON_NEGATIVE)
    resume_from_checkpoint: str | None = _f(
        None,
        "Continue from the latest checkpoint in --output-dir, or from the checkpoint folder given.",
        nargs="?",
        const="latest",
        aliases=["--resume"],
    )
    overwrite: bool = _f(False, "Replace a run already in --output-dir.")
    recipe: str | None = _f(
        None, "'paper' fills the paper's hyperparameters for the task; explicit flags win.", choices=("paper",)
    )
    device: str = _f("auto", "cpu, cuda, cuda:N or auto.")
    fsdp: str | None = _f(
        None, "Shard the model over the processes with PyTorch FSDP2 (launch 2 or more with torchrun or accelerate): "
              "each process keeps its rows of every weight and of IVON's state. full_shard gathers a block for its "
              "forward and again for its backward; shard_grad_op keeps it gathered between them (faster, more "
              "memory).", choices=FSDP_MODES)
    bf16: bool = _f(False, "bf16 autocast for forward and backward (decoder LMs on CUDA: the frozen base in bf16).")
    load_in: str | None = _f(None, "Decoder LMs: load the frozen base quantized by bitsandbytes (CUDA only).",
                             choices=("8bit", "4bit"))
    # stock peft and ivon-opt stay one flag away, to check the fast path's numbers against
    fast_path: bool = _f(True, "AdaLoRA methods: batched penalty, fused layer, in-place IVON (same numbers); "
                               "--no-fast-path runs stock peft and ivon-opt.")
    progress: bool = _f(True, "Show a progress bar.")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            coerce_field(self, f)
            check_field(f, getattr(self, f.name))
        self._check_together()

    def _check_together(self) -> None:
        """Checks across fields (each field alone is checked by `check_field`)."""
        get_task(self.task)
        check_own_files(self.task, self.train_file, self.validation_file)
        method = get_method(self.method)
        if len(self.report_to) > 1 and ({"none", "all"} & set(self.report_to)):
            raise UserError(f"--report-to {' '.join(self.report_to)}: none and all stand alone; name the trackers, "
                            f"or give one of them")
        if self.per_device_train_batch_size is None and self.batch_size % self.gradient_accumulation_steps:
            raise UserError(f"--batch-size {self.batch_size} must split into --gradient-accumulation-steps "
                            f"{self.gradient_accumulation_steps} equal micro-batches")
        if not DEVICE.match(self.device):
            raise UserError(f"--device {self.device!r} is not a device: choose cpu, cuda, cuda:N or auto")
        for name in ("mc_samples", "log_correlations"):
            if getattr(self, name) and not method.uses_ivon:
                raise UserError(
                    f"{flag(name)} reads IVON's posterior and needs --method bayes-adalora or adalora-ivon, "
                    f"not {self.method}"
                )
        if self.target_r > self.init_r:
            raise UserError(
                f"--target-r {self.target_r} is larger than --init-r {self.init_r}: the budget can only fall"
            )
        if self.target_r == self.init_r and method.uses_adalora:
            raise UserError(f"--target-r equals --init-r ({self.init_r}): AdaLoRA has no rank to reallocate; "
                            f"lower --target-r, or use --method lora for a fixed rank")
        if self.text_columns is not None:  # "a,b" is two columns, as "a b" is; '"a,b"' is one, quoted as in CSV
            self.text_columns = [c for given in self.text_columns for c in next(csv.reader([given])) if c]
        if self.text_columns is not None and not 1 <= len(self.text_columns) <= 2:
            raise UserError(f"--text-columns takes one or two column names, got {len(self.text_columns)}")
        if self.load_in and get_task(self.task).peft_task_type != "CAUSAL_LM":
            raise UserError(f"--load-in {self.load_in} is for the decoder-LM tasks (causal-lm, multiple-choice)")
        if self.load_in and method.adapter is None:
            raise UserError(f"--load-in {self.load_in} quantizes the frozen base under an adapter; --method full "
                            f"trains every weight and cannot train quantized ones")
        if self.criterion != DEFAULT_CRITERION and not method.reads_posterior:  # the default: no criterion read
            raise UserError(f"--criterion {self.criterion} reads IVON's posterior and needs --method bayes-adalora, "
                            f"not {self.method}")
        if self.fsdp and not self.fast_path and method.uses_adalora:
            raise UserError("--fsdp runs AdaLoRA on the fast path, whose penalty and masks read shards; stock peft's "
                            "(--no-fast-path) read whole weights: drop --no-fast-path")
        if self.fsdp and self.load_in:
            raise UserError(f"--fsdp does not yet combine with --load-in {self.load_in} (a quantized base is not "
                            f"sharded yet)")
        if self.lambda_init != "zero" and not method.uses_adalora:
            raise UserError(f"--lambda-init sets AdaLoRA's lambda and needs an AdaLoRA method, not {self.method}")

    @property
    def method_spec(self):
        """The method's entry in the registry (`methods.METHODS`)."""
        return get_method(self.method)

    @property
    def uses_ivon(self) -> bool:
        return self.method_spec.uses_ivon

    @property
    def uses_adalora(self) -> bool:
        return self.method_spec.uses_adalora

    @property
    def logs_correlations(self) -> bool:
        return self.uses_adalora and self.uses_ivon if self.log_correlations is None else self.log_correlations

    def resolved_lr(self) -> float:
        """--learning-rate, else the method's default; IVON's default over --ivon-hess-init: ivon-opt scales its step by
        the initial Hessian (`rescale_lr`), so its first steps keep one size whatever that Hessian is."""
        if self.learning_rate is not None:
            return self.learning_rate
        spec = self.method_spec
        return spec.default_lr / self.ivon_hess_init if spec.uses_ivon else spec.default_lr

    def to_dict(self) -> dict:
        """The settings as config.json holds them: a text column whose name holds a comma or a quote quoted as
        in CSV, so that the file read back (`--config`, `evaluate`) names the same columns."""
        values = dataclasses.asdict(self)
        if self.text_columns is not None:
            values["text_columns"] = [csv_quoted(c) for c in self.text_columns]
        return values


def csv_quoted(name: str) -> str:
    """`name` as one field of a CSV row: quoted where it holds a comma or a quote."""
    if "," not in name and '"' not in name:
        return name
    return '"' + name.replace('"', '""') + '"'


def flag(name: str) -> str:
    """The command-line flag of a config field: `ivon_ess` -> `--ivon-ess`."""
    return "--" + name.replace("_", "-")


def field_type(f: dataclasses.Field, owner: type | None = None) -> type:
    """The field's type without None: `int | None` -> int, `list[str] | None` -> list[str]."""
    hint = typing.get_type_hints(owner or TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args and typing.get_origin(hint) is not list else hint


def coerce_field(obj, f: dataclasses.Field) -> None:
    """The lenient conversions, in place: a whole float for an int field (32.0 from a JSON file or the
    Python API is 32), a tuple for a list field, and one name for a list of choices (`report_to="wandb"`, as
    `TrainingArguments` takes it)."""
    value, kind = getattr(obj, f.name), field_type(f, type(obj))
    if kind is int and isinstance(value, float) and value.is_integer():
        setattr(obj, f.name, int(value))
    elif isinstance(value, tuple) and typing.get_origin(kind) is list:
        setattr(obj, f.name, list(value))
    elif isinstance(value, str) and typing.get_origin(kind) is list and "choices" in f.metadata:
        setattr(obj, f.name, [value])


# the bounds of TrainConfig's number fields by name (the dataclass holds the field objects _f made)
FIELD_BOUNDS: dict[str, Bounds] = {f.name: _BOUNDS_OF_FIELD[id(f)] for f in dataclasses.fields(TrainConfig)
                                   if id(f) in _BOUNDS_OF_FIELD}


def bounds_of(f: dataclasses.Field) -> Bounds | None:
    """The bounds of a number field (of `TrainConfig`, or a field made like one: same name), None for others."""
    return FIELD_BOUNDS.get(f.name)


def check_field(f: dataclasses.Field, value, owner: type | None = None) -> None:
    """One field's value against its metadata: one of its `choices`, or a number within its `bounds`
    (finite, and whole for an int field); None passes where the field allows it. `owner`: the
    dataclass of the field (default `TrainConfig`)."""
    if isinstance(value, str) and value in getattr(bounds_of(f), "words", ()):
        return
    if value is None:
        if type(None) not in typing.get_args(typing.get_type_hints(owner or TrainConfig)[f.name]):
            raise UserError(f"{flag(f.name)} needs a value, got none")
        return
    kind = field_type(f, owner)
    if kind is bool and not isinstance(value, bool):
        raise UserError(f"{flag(f.name)} must be true or false, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise UserError(f"{flag(f.name)} must be a string, got {value!r}")
    if typing.get_origin(kind) is list and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        shown = f"the string {value!r} (write [{json.dumps(value)}] for one name)" if isinstance(value, str) else repr(
            value)
        raise UserError(f"{flag(f.name)} must be a list of names, got {shown}")
    for one in value if isinstance(value, list) else [value]:  # a list field's choices are its items'
        if "choices" in f.metadata and one not in f.metadata["choices"]:
            raise UserError(
                f"unknown {f.name.replace('_', ' ')} {one!r}: choose one of {', '.join(f.metadata['choices'])}"
            )
    bounds = bounds_of(f)
    if bounds is None:
        return
    integer = kind is int
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        options = ["a number", *bounds.words]
        listed = " or ".join(options) if len(options) < 3 else f"{', '.join(options[:-1])} or {options[-1]}"
        raise UserError(f"{flag(f.name)} must be {listed}, got {value!r}")
    if not math.isfinite(value):
        raise UserError(f"{flag(f.name)} must be a finite number, got {value}")
    if integer and value != int(value):
        raise UserError(f"{flag(f.name)} must be a whole number, got {value}")
    if not bounds.contains(value):
        shown = repr(value)
        why = f": {bounds.why}" if bounds.why else ""
        raise UserError(f"{flag(f.name)} must {bounds.phrase(integer)}, got {shown}{why}")


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


# settings renamed to the name `TrainingArguments` gives them; the old names are read from settings files and
# `make_config`, and the command line takes them as aliases of the new flags
RENAMED = {"lr": "learning_rate", "epochs": "num_train_epochs", "lr_schedule": "lr_scheduler_type",
           "eval_batch_size": "per_device_eval_batch_size", "resume": "resume_from_checkpoint"}


def current_names(values: dict) -> dict:
    """`values` (settings, or a run's config.json) under the current names; an old `lr_schedule: constant`,
    which warmed up, is transformers' `constant_with_warmup` (its `constant` has no warm-up)."""
    renamed = {RENAMED.get(k, k): v for k, v in values.items()}
    if values.get("lr_schedule") == "constant":
        renamed["lr_scheduler_type"] = "constant_with_warmup"
    if isinstance(values.get("derived"), list):
        renamed["derived"] = [RENAMED.get(k, k) for k in values["derived"]]
    return renamed


def make_config(given: dict, base: dict | None = None) -> tuple[TrainConfig, set[str]]:
    """A TrainConfig from defaults, then the recipe if asked for, then `base` (e.g. a run's config.json,
    `--config`), then the explicitly `given` values, which win; a recipe `given` beside a `base` of a run
    without it goes over the base (and its step count), under the given values. The settings a config.json lists as
    `derived` (left unset in its run) are left unset again, so they follow the new run's length, data
    and method.

    Returns the config and the names given explicitly.
    """
    names = {f.name for f in config_fields()}
    given, base = current_names(given), current_names(base or {})
    if "batch_size" in given and "per_device_train_batch_size" in given:
        raise UserError("--batch-size and --per-device-train-batch-size both set the batch: give one of them")
    unknown = set(given) - names
    if unknown:
        raise UserError(f"unknown setting {sorted(unknown)[0]!r}")
    base = base or {}
    derived = base.get("derived") if isinstance(base.get("derived"), list) else []  # derived again, not frozen
    kept = {k: v for k, v in base.items() if k in names and k not in derived}
    if "ivon_ess" in derived and "ivon_ess_resolved" not in base:  # a run planned before --ivon-ess auto: its
        kept["ivon_ess"] = TRAIN_SIZE  # derived ess was the training-set size, so a rerun's is again
    if "num_train_epochs" in given and "max_steps" not in given:
        kept.pop("max_steps", None)  # --num-train-epochs beside a file that counted steps: the epochs count
    stated = {**kept, **given}
    fields = {f.name: f for f in config_fields()}
    for name in ("task", "method"):  # the recipe reads them before TrainConfig checks the rest
        check_field(fields[name], stated.get(name, fields[name].default))
    recipe = paper_recipe(get_task(stated.get("task", "sst2")).name, stated.get("method", "bayes-adalora")) \
        if stated.get("recipe") == "paper" else {}
    if given.get("recipe") == "paper" and kept.get("recipe") != "paper":
        if "max_steps" not in given:  # the recipe counts epochs: a step count of the file's run goes
            kept.pop("max_steps", None)
        values = {**kept, **recipe, **given}  # --recipe paper beside a file of another run: the recipe over it
    else:
        values = {**recipe, **stated}
    if "criterion" not in given and not get_method(values.get("method", fields["method"].default)).reads_posterior:
        values.pop("criterion", None)  # a --config file's criterion is not read by another method: not carried over
    config = TrainConfig(**values)
    if "criterion" in given and not config.method_spec.reads_posterior:
        raise UserError(
            f"--criterion {config.criterion} reads IVON's posterior and needs --method bayes-adalora, "
            f"not {config.method}"
        )
    return config, set(given)


# ----------------------------------------------------------------------------- the run plan


def data_dir_of(config: TrainConfig) -> str | None:
    """The GLUE folder the run reads: --data-dir, else $GLUE_DIR, else None (the hub)."""
    return config.data_dir or os.environ.get("GLUE_DIR") or None


def total_steps_for(config: TrainConfig, batches_per_epoch: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(config.num_train_epochs * batches_per_epoch))


def check_phases(tinit: int, tfinal: int, total_steps: int, flags: bool = True) -> None:
    """AdaLoRA's budget falls between steps tinit and total_steps - tfinal: that interval must not be empty
    (the command line's run plan and the Trainer's callback check it alike; `flags`: named as the command
    line's flags, else as `AdaLoraConfig`'s fields)."""
    if tinit < 0 or tfinal < 0 or tinit >= total_steps - tfinal:
        if flags:
            raise UserError(f"--tinit {tinit} and --tfinal {tfinal} leave no steps for the budget to fall in a "
                            f"{total_steps}-step run")
        raise UserError(f"AdaLoRA's tinit ({tinit}) and tfinal ({tfinal}) leave no steps for the rank budget to fall "
                        f"in the Trainer's {total_steps} steps: lower them or train longer")


def adalora_phases(config: TrainConfig, total_steps: int) -> tuple[int, int, int]:
    """(tinit, tfinal, delta_t): the flags where given, else defaults that scale with the run."""
    tinit, tfinal, delta_t = default_adalora_phases(total_steps)
    tinit = config.tinit if config.tinit is not None else tinit
    tfinal = config.tfinal if config.tfinal is not None else tfinal
    delta_t = config.delta_t if config.delta_t is not None else delta_t
    check_phases(tinit, tfinal, total_steps)
    if total_steps - tfinal < 2 and config.method_spec.allocator == "sensitivity":
        # peft masks for the last time at step total - tfinal without a sensitivity update there: at step 1
        # it has none yet and fails (KeyError); the posterior allocator reads IVON's state instead
        raise UserError(
            f"--method {config.method} needs a step of sensitivity before its final mask, which falls at step "
            f"{total_steps - tfinal} of {total_steps} (--tfinal {tfinal}): train 2 steps or more, or lower --tfinal"
        )
    return tinit, tfinal, delta_t


@dataclass(frozen=True)
class RunPlan:
    """What a run does, every default resolved: computed once, by `plan_run`, and saved as config.json."""

    model: str
    data_dir: str | None
    learning_rate: float
    total_steps: int
    warmup_steps: int
    eval_steps: int
    ivon_ess_resolved: float | None  # IVON methods only: --ivon-ess, auto and train-size resolved for the run
    ivon_beta2_resolved: float | None  # IVON methods only: --ivon-beta2, auto resolved for the run's length
    tinit: int | None  # AdaLoRA methods only: its phases
    tfinal: int | None
    delta_t: int | None
    num_labels: int
    labels: list[str] | None = None  # the class names in class-index order (regression: None)


def plan_run(config: TrainConfig, model: str, train_examples: int, batches_per_epoch: int,
             spec: TaskSpec | None = None, trainable_parameters: int | None = None) -> RunPlan:
    """The run's resolved plan, from the config and the size of its training data; `spec` is the
    task's as its data gave it (classification: with the classes read from the training file);
    `trainable_parameters`: the adapted model's, which `--ivon-ess auto` needs."""
    spec = spec or get_task(config.task)
    total_steps = total_steps_for(config, batches_per_epoch)
    tinit, tfinal, delta_t = adalora_phases(config, total_steps) if config.uses_adalora else (
        config.tinit, config.tfinal, config.delta_t)
    warmup = config.warmup_steps if config.warmup_steps is not None else int(0.06 * total_steps)
    if warmup > total_steps:
        raise UserError(f"--warmup-steps {warmup} is longer than the run's {total_steps} steps: the learning rate "
                        f"would never reach its peak; lower --warmup-steps or train longer")
    if config.lr_scheduler_type == "two-phase" and not warmup < config.two_phase_const < total_steps:
        raise UserError(f"--two-phase-const {config.two_phase_const} must lie after the warm-up's end (step {warmup}) "
                        f"and before the run's last step ({total_steps}), or the schedule skips a phase")
    return RunPlan(
        model=model, data_dir=data_dir_of(config), learning_rate=config.resolved_lr(), total_steps=total_steps,
        warmup_steps=warmup,
        eval_steps=config.eval_steps or max(1, total_steps // 10),
        ivon_ess_resolved=resolve_ess(config.ivon_ess, train_examples, trainable_parameters)
        if config.uses_ivon else None,
        ivon_beta2_resolved=resolve_beta2(config.ivon_beta2, total_steps) if config.uses_ivon else None,
        tinit=tinit, tfinal=tfinal, delta_t=delta_t, num_labels=spec.num_labels,
        labels=None if spec.labels is None else list(spec.labels),
    )


# settings that, left unset, the plan derives from the run: its method, length and data
DERIVED = ("model", "data_dir", "learning_rate", "warmup_steps", "eval_steps", "ivon_ess", "tinit", "tfinal", "delta_t")


def planned_config(config: TrainConfig, plan: RunPlan) -> dict:
    """config.json: every field with its resolved value, plus the plan's step count and classes, and
    `derived`: the settings that were left unset and took the plan's value.

    Fed back with `--config`, it reruns the same plan on the same data; the derived settings are derived
    again, so `--config run/config.json --max-steps 3000` (or another method or data) scales the warm-up,
    the evaluations, the AdaLoRA phases, IVON's ess and the learning rate as a fresh run would.
    """
    derived = [name for name in DERIVED if getattr(config, name) is None]
    if config.recipe == "paper":  # what the recipe filled in, it fills in again (for the new task or method)
        filled = paper_recipe(get_task(config.task).name, config.method)
        derived += [name for name, value in filled.items() if getattr(config, name) == value and name not in derived]
    return {**config.to_dict(), **dataclasses.asdict(plan), "derived": derived}
