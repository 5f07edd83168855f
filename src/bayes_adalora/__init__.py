"""bayes-adalora: AdaLoRA fine-tuning whose rank allocation reads IVON's posterior."""

from .config import RunPlan, TrainConfig, make_config
from .errors import UserError
from .importance import POSTERIOR_CRITERIA, posterior_score
from .methods import METHODS, Method
from .tasks import TASKS, get_task

__version__ = "0.1.0"

# The training API, imported on first use: `import bayes_adalora` stays light (no torch, transformers or peft).
LAZY = {
    "install_posterior_allocator": "allocator",
    "posterior_predictive": "predict",
    "load_posterior_sigma": "adapters",
    "export_run": "export",
    "evaluate_run": "run_io",
    "AdaLoraTrainer": "hf_trainer",
    "IVONArguments": "trainer_args",
    "IVONTrainer": "hf_trainer",
    "make_trainer": "hf_trainer",
    "RankAllocationCallback": "trainer_callback",
    "compute_metrics": "trainer_metrics",
    "compute_lm_metrics": "trainer_metrics",
    "reduce_lm_logits": "trainer_metrics",
}

__all__ = [
    *LAZY,
    "METHODS",
    "POSTERIOR_CRITERIA",
    "TASKS",
    "Method",
    "RunPlan",
    "TrainConfig",
    "UserError",
    "get_task",
    "make_config",
    "posterior_score",
    "run",
]


def run(config: TrainConfig) -> dict:
    """Run a fine-tuning job as the CLI does (`bayes_adalora.train.train`, with the figures of `plots`)."""
    # deferred: `import bayes_adalora` stays light (no torch, transformers or peft)
    from .plots import plot_run
    from .train import train

    return train(config, figures=plot_run)


def __getattr__(name: str):
    if name in LAZY:
        import importlib

        return getattr(importlib.import_module(f".{LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
