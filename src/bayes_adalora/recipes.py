"""The paper's GLUE hyperparameters (DeBERTaV3-base, rank-2 budget), as TrainConfig field values.

Source: shared/recipes/paper-glue.md (the authors' run scripts). `--recipe paper` applies them;
flags given explicitly on the command line win.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError
from .ivon_settings import TRAIN_SIZE
from .methods import get_method


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
    "mnli": PaperTask(max_length=256, epochs=7, adamw_lr=5e-4, ivon_lr=0.4, warmup_adamw=1000, warmup_ivon=500,
                      lora_alpha=16, orth_reg=0.1, tinit=8000, tfinal=50000, delta_t=100, lora_lr=2e-4, full_lr=1.5e-5),
    "sst2": PaperTask(max_length=128, epochs=24, adamw_lr=8e-4, ivon_lr=0.4, warmup_adamw=1000, warmup_ivon=500,
                      lora_alpha=16, orth_reg=0.1, tinit=6000, tfinal=22000, delta_t=100, lora_lr=2e-4, full_lr=2e-5),
    "cola": PaperTask(max_length=64, epochs=25, adamw_lr=8e-4, ivon_lr=(2.0, 0.4), warmup_adamw=100, warmup_ivon=100,
                      lora_alpha=32, orth_reg=0.1, tinit=800, tfinal=3500, delta_t=10, lora_lr=2e-4, full_lr=2e-5,
                      two_phase_const=500),
    "qqp": PaperTask(max_length=320, epochs=5, adamw_lr=8e-4, ivon_lr=0.4, warmup_adamw=2000, warmup_ivon=500,
                     lora_alpha=16, orth_reg=0.1, tinit=8000, tfinal=25000, delta_t=100, lora_lr=2e-4, full_lr=2e-5),
    "qnli": PaperTask(max_length=512, epochs=5, adamw_lr=5e-4, ivon_lr=0.4, warmup_adamw=500, warmup_ivon=500,
                      lora_alpha=32, orth_reg=0.1, tinit=2000, tfinal=8000, delta_t=100, lora_lr=2e-4, full_lr=2e-5),
    "rte": PaperTask(max_length=320, epochs=50, adamw_lr=1.2e-3, ivon_lr=(2.0, 0.5), warmup_adamw=200, warmup_ivon=100,
                     lora_alpha=32, orth_reg=0.3, tinit=600, tfinal=1800, delta_t=1, lora_lr=2e-4, full_lr=2e-5,
                     two_phase_const=400),
    "mrpc": PaperTask(max_length=320, epochs=30, adamw_lr=1e-3, ivon_lr=(2.0, 0.5), warmup_adamw=100, warmup_ivon=100,
                      lora_alpha=32, orth_reg=0.1, tinit=600, tfinal=1800, delta_t=1, lora_lr=2e-4, full_lr=2e-5,
                      two_phase_const=400),
    "stsb": PaperTask(max_length=128, epochs=25, adamw_lr=2.2e-3, ivon_lr=(2.0, 0.4), warmup_adamw=100, warmup_ivon=100,
                      lora_alpha=32, orth_reg=0.3, tinit=800, tfinal=2000, delta_t=10, lora_lr=2e-4, full_lr=2e-5,
                      two_phase_const=500),
}


def paper_recipe(task: str, method: str) -> dict:
    """TrainConfig values of the paper's setting for `task` and `method` (rank-2 budget)."""
    if task not in PAPER_GLUE:
        raise UserError(f"the paper recipe has no settings for task {task!r} (it covers {', '.join(PAPER_GLUE)})")
    t = PAPER_GLUE[task]
    kind = get_method(method)
    values = dict(
        max_length=t.max_length, num_train_epochs=t.epochs, batch_size=32, weight_decay=0.0,
        init_r=3, target_r=2, lora_r=2, lora_alpha=t.lora_alpha, orth_reg=t.orth_reg,
        tinit=t.tinit, tfinal=t.tfinal, delta_t=t.delta_t,
        sensitivity_beta1=0.85, sensitivity_beta2=0.85,
        ivon_ess=TRAIN_SIZE, ivon_hess_init=1.0, ivon_beta1=0.9, ivon_beta2=0.99999, ivon_weight_decay=1e-8,
        ivon_clip_radius=1e-3, train_mc_samples=1,
    )
    if kind.uses_ivon:
        values["warmup_steps"] = t.warmup_ivon
        if isinstance(t.ivon_lr, tuple):
            values.update(learning_rate=1.0, lr_scheduler_type="two-phase", two_phase_first=t.ivon_lr[0],
                          two_phase_second=t.ivon_lr[1], two_phase_const=t.two_phase_const)
        else:
            values.update(learning_rate=t.ivon_lr, lr_scheduler_type="linear")
    else:
        values["warmup_steps"] = t.warmup_adamw
        values["learning_rate"] = {"adalora": t.adamw_lr, "lora": t.lora_lr, "full": t.full_lr}[kind.family]
        values["lr_scheduler_type"] = "linear"
    if method == "full" and task == "sst2":
        values["num_train_epochs"] = 6
    if method == "full" and task == "qnli":
        values["num_train_epochs"] = 4
    return values
