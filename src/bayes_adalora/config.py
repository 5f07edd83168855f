"""The run configuration: one dataclass whose fields carry their help text, serving the CLI and the API."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import UserError
from .importance import DEFAULT_CRITERION, POSTERIOR_CRITERIA

METHODS = ("bayes-adalora", "adalora-ivon", "adalora", "lora", "full")
IVON_METHODS = ("bayes-adalora", "adalora-ivon")
ADALORA_METHODS = ("bayes-adalora", "adalora-ivon", "adalora")
LR_SCHEDULES = ("linear", "two-phase", "constant")

# Learning rates when --lr is not given, per optimizer family (tuned on MiniLM / SST-2, see README).
DEFAULT_LR = {"ivon": 3.0, "adalora": 2e-3, "lora": 1e-3, "full": 3e-5}


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # what to train
    task: str = _f("sst2", "GLUE task: cola sst2 mrpc stsb qqp mnli qnli rte wnli.")
    method: str = _f("bayes-adalora", "Fine-tuning method.", choices=METHODS)
    criterion: str = _f(DEFAULT_CRITERION, "Posterior importance criterion (bayes-adalora only).", choices=POSTERIOR_CRITERIA)
    model: str | None = _f(None, "HF model name or path; default: the packaged all-MiniLM-L6-v2 (offline).")
    target_modules: list[str] | None = _f(None, "Module-name suffixes to adapt; default: the architecture's preset.")
    trust_remote_code: bool = _f(False, "Allow model code from the hub (off unless asked for).")
    # data
    data_dir: str | None = _f(None, "Folder of GLUE TSVs (<TASK>/train.tsv, dev.tsv); default $GLUE_DIR, else the hub.")
    train_file: str | None = _f(None, "Your own training data (.csv .tsv .json .jsonl).")
    validation_file: str | None = _f(None, "Your own validation data (same format as --train-file).")
    text_columns: list[str] | None = _f(None, "Text column(s) in --train-file (one or two).")
    label_column: str | None = _f(None, "Label column in --train-file (default: label).")
    max_length: int = _f(128, "Truncate inputs to this many tokens (padding is per batch).")
    max_train_samples: int | None = _f(None, "Use only the first N training examples.")
    max_eval_samples: int | None = _f(None, "Use only the first N examples of each dev split.")
    # schedule
    batch_size: int = _f(32, "Training batch size.")
    eval_batch_size: int = _f(128, "Evaluation batch size.")
    max_steps: int | None = _f(None, "Number of optimizer steps (wins over --epochs).")
    epochs: float = _f(3.0, "Number of passes over the training data, when --max-steps is not given.")
    lr: float | None = _f(None, "Peak learning rate; default per optimizer: IVON 3.0, AdaLoRA 2e-3, LoRA 1e-3, full 3e-5.")
    lr_schedule: str = _f("linear", "linear warm-up and decay, the paper's two-phase IVON schedule, or constant after warm-up.", choices=LR_SCHEDULES)
    warmup_steps: int | None = _f(None, "Learning-rate warm-up steps (default: 6% of the run).")
    two_phase_first: float = _f(2.0, "two-phase: multiplier reached after warm-up and held until --two-phase-const.")
    two_phase_second: float = _f(0.4, "two-phase: multiplier that then falls linearly to 0.")
    two_phase_const: int = _f(500, "two-phase: last step at the first multiplier.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    eval_steps: int | None = _f(None, "Evaluate every N steps (default: 10 times per run) and at the end.")
    seed: int = _f(0, "Random seed (same seed, same result on the CPU).")
    # adapters
    init_r: int = _f(6, "AdaLoRA initial rank per matrix.")
    target_r: int = _f(4, "AdaLoRA final average rank per matrix.")
    tinit: int | None = _f(None, "AdaLoRA steps at the initial budget (default: 10% of the run).")
    tfinal: int | None = _f(None, "AdaLoRA final steps at the fixed pattern (default: 30% of the run).")
    delta_t: int | None = _f(None, "AdaLoRA steps between maskings (default: ~60 maskings in the fall).")
    orth_reg: float = _f(0.1, "AdaLoRA orthogonality penalty weight.")
    sensitivity_beta1: float = _f(0.85, "AdaLoRA sensitivity EMA (adalora, adalora-ivon).")
    sensitivity_beta2: float = _f(0.85, "AdaLoRA uncertainty EMA (adalora, adalora-ivon).")
    lora_r: int = _f(4, "LoRA rank (method lora).")
    lora_alpha: float = _f(32.0, "LoRA/AdaLoRA alpha (update scale).")
    lora_dropout: float = _f(0.0, "Dropout on the adapter input.")
    # IVON
    ivon_ess: float | None = _f(None, "IVON effective sample size (default: the training-set size).")
    ivon_hess_init: float = _f(1.0, "IVON initial Hessian.")
    ivon_beta1: float = _f(0.9, "IVON momentum.")
    ivon_beta2: float = _f(0.99999, "IVON Hessian EMA.")
    ivon_weight_decay: float = _f(1e-8, "IVON weight decay (prior precision per example).")
    ivon_clip_radius: float = _f(1e-3, "IVON elementwise update clip.")
    train_mc_samples: int = _f(1, "IVON posterior samples per training step.")
    mc_samples: int = _f(0, "Posterior predictive at the final evaluation: average over K draws from IVON's posterior (0: off).")
    log_correlations: bool | None = _f(None, "Log Spearman correlations of sensitivity and posterior triplet scores at "
                                             "each allocation step to correlations.json (default: on for IVON methods).")
    plots: bool = _f(True, "Write PNG plots of the run into the output folder at the end.")
    # running
    output_dir: str = _f("runs/latest", "Where results.json, adapter/, posterior.safetensors and config.json go.")
    divergence_factor: float = _f(100.0, "Stop when the loss exceeds this many times the first step's (0: only NaN/inf stops).")
    save_steps: int | None = _f(None, "Write a checkpoint (for --resume) every N steps into OUTPUT_DIR/checkpoints.")
    save_total_limit: int = _f(2, "Checkpoints kept, the latest ones (0 keeps all).")
    resume: str | None = _f(None, "Continue from the latest checkpoint in --output-dir, or from the checkpoint folder given.",
                            nargs="?", const="latest")
    overwrite: bool = _f(False, "Replace a run already in --output-dir.")
    recipe: str | None = _f(None, "'paper' fills the paper's hyperparameters for the task; explicit flags win.", choices=("paper",))
    device: str = _f("auto", "cpu, cuda, cuda:N or auto.")
    bf16: bool = _f(False, "bf16 autocast for forward and backward.")
    fast_path: bool = _f(True, "AdaLoRA methods: batched penalty, fused layer, in-place IVON (same numbers); "
                               "--no-fast-path runs stock peft and ivon-opt.")  # issue 11
    progress: bool = _f(True, "Show a progress bar.")

    @property
    def uses_ivon(self) -> bool:
        return self.method in IVON_METHODS

    @property
    def uses_adalora(self) -> bool:
        return self.method in ADALORA_METHODS

    @property
    def logs_correlations(self) -> bool:
        return self.uses_adalora and self.uses_ivon if self.log_correlations is None else self.log_correlations

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        family = "ivon" if self.uses_ivon else ("adalora" if self.uses_adalora else self.method)
        return DEFAULT_LR[family]

    def validate(self, explicit: set[str] = frozenset()) -> None:
        """Checks that need no data or model; raises UserError with one sentence."""
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.criterion not in POSTERIOR_CRITERIA:
            raise UserError(f"unknown criterion {self.criterion!r}: choose one of {', '.join(POSTERIOR_CRITERIA)}")
        if "criterion" in explicit and self.method != "bayes-adalora":
            raise UserError(
                f"--criterion {self.criterion} reads IVON's posterior and needs --method bayes-adalora, not {self.method}"
            )
        if self.mc_samples < 0:
            raise UserError(f"--mc-samples must be 0 (off) or positive, got {self.mc_samples}")
        for name in ("mc_samples", "log_correlations"):
            if getattr(self, name) and not self.uses_ivon:
                flag = f"--{name.replace('_', '-')}"
                raise UserError(f"{flag} reads IVON's posterior and needs --method bayes-adalora or adalora-ivon, not {self.method}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise UserError(f"--max-steps must be positive, got {self.max_steps}")
        if self.max_steps is None and self.epochs <= 0:
            raise UserError(f"--epochs must be positive, got {self.epochs}")
        if self.target_r > self.init_r:
            raise UserError(f"--target-r {self.target_r} is larger than --init-r {self.init_r}: the budget can only fall")
        if self.target_r == self.init_r and self.uses_adalora:
            raise UserError(f"--target-r equals --init-r ({self.init_r}): AdaLoRA has no rank to reallocate; "
                            f"lower --target-r, or use --method lora for a fixed rank")
        ranges = {  # name: (low, high, low included, high included)
            "orth_reg": (0, math.inf, True, False), "lora_dropout": (0, 1, True, False),
            "sensitivity_beta1": (0, 1, False, False), "sensitivity_beta2": (0, 1, False, False),
            "ivon_beta1": (0, 1, True, False), "ivon_beta2": (0, 1, True, False),
            "ivon_hess_init": (0, math.inf, False, False), "ivon_clip_radius": (0, math.inf, False, False),
            "ivon_weight_decay": (0, math.inf, True, False), "weight_decay": (0, math.inf, True, False),
        }
        for name, (low, high, low_in, high_in) in ranges.items():
            value = getattr(self, name)
            if not ((value >= low if low_in else value > low) and (value <= high if high_in else value < high)):
                interval = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
                raise UserError(f"--{name.replace('_', '-')} must lie in {interval}, got {value:g}")
        if self.divergence_factor != 0 and not self.divergence_factor >= 1:
            raise UserError(f"--divergence-factor must be 0 (off) or at least 1, got {self.divergence_factor:g}: "
                            f"a smaller factor stops any run at its first step")
        positive = ("batch_size", "eval_batch_size", "max_length", "init_r", "target_r", "lora_r", "train_mc_samples")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("delta_t", "eval_steps", "max_train_samples", "max_eval_samples", "ivon_ess", "save_steps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.lr is not None and self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.text_columns is not None and not 1 <= len(self.text_columns) <= 2:
            raise UserError(f"--text-columns takes one or two column names, got {len(self.text_columns)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


def make_config(given: dict) -> tuple[TrainConfig, set[str]]:
    """A TrainConfig from explicitly given values: defaults, then the recipe if asked for, then `given`.

    Returns the config and the names given explicitly (explicit flags win over the recipe).
    """
    from .recipes import paper_recipe
    from .tasks import get_task

    names = {f.name for f in config_fields()}
    unknown = set(given) - names
    if unknown:
        raise UserError(f"unknown setting {sorted(unknown)[0]!r}")
    config = TrainConfig(**given)
    if config.recipe == "paper":
        recipe = paper_recipe(get_task(config.task).name, config.method)
        config = TrainConfig(**{**recipe, **given})
    config.validate(set(given))
    return config, set(given)
