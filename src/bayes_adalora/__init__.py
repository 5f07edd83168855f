"""bayes-adalora: AdaLoRA fine-tuning whose rank allocation reads IVON's posterior."""

from .config import TrainConfig, make_config
from .errors import UserError
from .importance import POSTERIOR_CRITERIA, posterior_score
from .tasks import TASKS, get_task

__version__ = "0.1.0"

__all__ = ["TrainConfig", "make_config", "UserError", "POSTERIOR_CRITERIA", "posterior_score", "TASKS", "get_task", "train"]


def train(config: TrainConfig) -> dict:
    """Run a fine-tuning job (see `bayes_adalora.train.train`)."""
    from .train import train as _train

    return _train(config)
