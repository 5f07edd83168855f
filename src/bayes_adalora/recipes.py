"""The paper's GLUE hyperparameters (DeBERTaV3-base, rank-2 budget), as TrainConfig field values.

Source: shared/recipes/paper-glue.md (the authors' run scripts). `--recipe paper` applies them;
flags given explicitly on the command line win.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

PAPER_MODEL = "microsoft/deberta-v3-base"


@dataclass(frozen=True)
class PaperTask:
    max_length: int
    epochs: float
    adamw_lr: float
    ivon_lr: float | tuple[float, float]  # a pair: two-phase multipliers (first, second) on base lr 1.0
    warmup_adamw: int
    warmup_ivon: int
    lora_alpha: float
    orth_reg: float
    tinit: int
    tfinal: int
    delta_t: int
    lora_lr: float
    full_lr: float
    two_phase_const: int = 0


PAPER_GLUE: dict[str, PaperTask] = {
    "mnli": PaperTask(256, 7, 5e-4, 0.4, 1000, 500, 16, 0.1, 8000, 50000, 100, 2e-4, 1.5e-5),
    "sst2": PaperTask(128, 24, 8e-4, 0.4, 1000, 500, 16, 0.1, 6000, 22000, 100, 2e-4, 2e-5),
    "cola": PaperTask(64, 25, 8e-4, (2.0, 0.4), 100, 100, 32, 0.1, 800, 3500, 10, 2e-4, 2e-5, 500),
    "qqp": PaperTask(320, 5, 8e-4, 0.4, 2000, 500, 16, 0.1, 8000, 25000, 100, 2e-4, 2e-5),
    "qnli": PaperTask(512, 5, 5e-4, 0.4, 500, 500, 32, 0.1, 2000, 8000, 100, 2e-4, 2e-5),
    "rte": PaperTask(320, 50, 1.2e-3, (2.0, 0.5), 200, 100, 32, 0.3, 600, 1800, 1, 2e-4, 2e-5, 400),
    "mrpc": PaperTask(320, 30, 1e-3, (2.0, 0.5), 100, 100, 32, 0.1, 600, 1800, 1, 2e-4, 2e-5, 400),
    "stsb": PaperTask(128, 25, 2.2e-3, (2.0, 0.4), 100, 100, 32, 0.3, 800, 2000, 10, 2e-4, 2e-5, 500),
}


def paper_recipe(task: str, method: str) -> dict:
    """TrainConfig values of the paper's setting for `task` and `method` (rank-2 budget)."""
    if task not in PAPER_GLUE:
        raise UserError(f"the paper recipe has no settings for task {task!r} (it covers {', '.join(PAPER_GLUE)})")
    t = PAPER_GLUE[task]
    values = dict(
        max_length=t.max_length, epochs=t.epochs, batch_size=32, weight_decay=0.0,
        init_r=3, target_r=2, lora_r=2, lora_alpha=t.lora_alpha, orth_reg=t.orth_reg,
        tinit=t.tinit, tfinal=t.tfinal, delta_t=t.delta_t,
        sensitivity_beta1=0.85, sensitivity_beta2=0.85,
        ivon_hess_init=1.0, ivon_beta1=0.9, ivon_beta2=0.99999, ivon_weight_decay=1e-8,
        ivon_clip_radius=1e-3, train_mc_samples=1,
    )
    if method in ("bayes-adalora", "adalora-ivon"):
        values["warmup_steps"] = t.warmup_ivon
        if isinstance(t.ivon_lr, tuple):
            values.update(lr=1.0, lr_schedule="two-phase", two_phase_first=t.ivon_lr[0],
                          two_phase_second=t.ivon_lr[1], two_phase_const=t.two_phase_const)
        else:
            values.update(lr=t.ivon_lr, lr_schedule="linear")
    else:
        values["warmup_steps"] = t.warmup_adamw
        values["lr"] = {"adalora": t.adamw_lr, "lora": t.lora_lr, "full": t.full_lr}[method]
        values["lr_schedule"] = "linear"
    if method == "full" and task == "sst2":
        values["epochs"] = 6
    if method == "full" and task == "qnli":
        values["epochs"] = 4
    return values
