"""Checkpoints of a run FSDP sharded: written whole, as a run in one process writes them, and read back onto
each process's rows.

A checkpoint holds the trained tensors (the adapter, or every weight for `full`) and the optimizer's state
gathered whole, in the files and formats of an unsharded run's checkpoint; on resume every process reads them
and keeps a copy of its rows. The trained tensors are adapter-sized (the frozen base is not saved), so the
gathers are cheap; a sharded `full` run gathers its model and AdamW's state, one tensor at a time, into process
0's CPU memory at each save, as FSDP's FULL_STATE_DICT does, and every process reads them whole (on the CPU)
on resume. `ShardedModel` is the Trainer mixin; the functions are its parts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from peft.utils import load_peft_weights, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from .errors import UserError
from .ivon_inplace import ShardedIVON
from .sharding import copy_rows, is_sharded, model_is_sharded, reshard, rows_like
from .trainer_checkpoints import unwrap_optimizer


def whole_trained_state(model: nn.Module, full: bool) -> dict[str, torch.Tensor]:
    """What a run's files hold of a model FSDP sharded, gathered whole, for `save_pretrained(state_dict=...)`:
    every weight (`full`: process 0 alone keeps them, on the CPU, one tensor gathered at a time; the other
    processes get an empty dict), else the adapter's tensors and the modules trained in full (the frozen base is
    not gathered). Every process must call it."""
    if full:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    state = model.state_dict()  # FSDP2's: DTensors, nothing gathered
    kept = {k: v for k, v in state.items() if "lora_" in k or "modules_to_save" in k}
    return {k: (v.full_tensor() if is_sharded(v) else v).detach().cpu() for k, v in kept.items()}


def whole_optimizer_state(optimizer, keep: bool = True) -> dict | None:
    """The optimizer's state_dict as one process holding every parameter whole would save it (IVON's flat
    Hessian and momentum, adapter-sized, or AdamW's per-parameter moments, gathered one tensor at a time onto
    the CPU), for the process that `keep`s it (None for the others). Every process must call it."""
    if isinstance(optimizer, ShardedIVON):
        state = optimizer.whole_state_dict()
        return state if keep else None
    state = optimizer.state_dict()  # its per-parameter dicts are the live ones: copied, not changed
    whole = {}
    for index, entry in sorted(state["state"].items()):  # the same order in every process
        gathered = {k: v.full_tensor().cpu() if is_sharded(v) else v for k, v in entry.items()}
        if keep:
            whole[index] = gathered
    return {**state, "state": whole} if keep else None


def load_whole_optimizer_state(optimizer, state: dict) -> None:
    """Read a whole state_dict (`whole_optimizer_state`'s, or an unsharded run's) into an optimizer over
    parameters FSDP sharded: each process keeps its rows."""
    if not isinstance(optimizer, ShardedIVON):  # which keeps its rows of a whole state itself
        params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's numbering
        state = {**state, "state": {index: {k: rows_like(params[index], v) if isinstance(v, torch.Tensor) else v
                                            for k, v in entry.items()}
                                    for index, entry in state["state"].items()}}
    type(optimizer).load_state_dict(optimizer, state)  # the class's: the instance's may be ours, for the Trainer


def load_into_shards(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """`model.load_state_dict(state, strict=False)` for a model FSDP sharded and whole tensors in `state`: each
    process copies its rows of each. Returns (missing, unexpected) names, as `load_state_dict` does."""
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for name, value in state.items():
            if name in targets:
                copy_rows(targets[name], value)
    return [n for n in targets if n not in state], [n for n in state if n not in targets]


def check_all_loaded(model: nn.Module, folder: Path, missing: list[str], unexpected: list[str]) -> None:
    """Refuse a resume that would leave a trained weight as it was, or read a tensor into nothing."""
    trained_missing = [n for n, p in model.named_parameters() if p.requires_grad and n in set(missing)]
    if trained_missing or unexpected:
        what, names = ("missing", trained_missing) if trained_missing else ("unknown", unexpected)
        raise UserError(f"the checkpoint {folder} does not match this model ({what} weights: "
                        f"{', '.join(names[:3])}): resume it with the model it was trained from, or start again "
                        f"with --overwrite")


def load_whole_weights(model: nn.Module, folder: Path) -> None:
    """A checkpoint's trained tensors (an adapter, through peft's own renaming of its keys, or a model's
    safetensors files) into a model FSDP sharded."""
    if isinstance(model, PeftModel):
        # peft renames the keys and, for a model of DTensors, shards each whole tensor as its parameter is
        weights = load_peft_weights(str(folder), device="cpu")
        result = set_peft_model_state_dict(model, weights, adapter_name=model.active_adapter)
        return check_all_loaded(model, folder, result.missing_keys, result.unexpected_keys)
    weights = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        weights.update(load_file(file))
    check_all_loaded(model, folder, *load_into_shards(model, weights))


class ShardedModel:
    """A Trainer mixin for a model FSDP sharded before the Trainer (`sharding.shard_model`, which the Trainer does
    not know of): it is not wrapped in DDP (accelerate refuses DTensors there; FSDP already averages the
    gradients); its checkpoints are gathered whole on every process and written by process 0 in an unsharded
    run's files, and a resume reads them back onto each process's rows. A model not sharded is the Trainer's
    own business."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        prepare = self.accelerator.prepare_model

        def prepare_model(model, device_placement=None, evaluation_mode=False):
            if model_is_sharded(model):  # FSDP2 already: not wrapped in DDP
                self.accelerator._models.append(model)
                return model
            return prepare(model, device_placement=device_placement, evaluation_mode=evaluation_mode)

        self.accelerator.prepare_model = prepare_model

    def autocast_smart_context_manager(self, cache_enabled=True):
        """bf16 autocast for the forward of a model sharded here (accelerate gives it to the models it prepares,
        and this one it does not prepare)."""
        if self.args.bf16 and model_is_sharded(self.model):
            return torch.autocast(self.args.device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
        return super().autocast_smart_context_manager(cache_enabled)

    def evaluate(self, *args, **kwargs):
        try:
            return super().evaluate(*args, **kwargs)
        finally:  # shard_grad_op keeps the blocks gathered after a forward with no backward
            reshard(self.model)

    def predict(self, *args, **kwargs):
        try:
            return super().predict(*args, **kwargs)
        finally:
            reshard(self.model)

    def _load_best_model(self):
        if model_is_sharded(self.model):
            raise ValueError("load_best_model_at_end does not yet read a checkpoint back into a model FSDP sharded: "
                             "leave it unset, or train without fsdp")
        return super()._load_best_model()

    def save_model(self, output_dir=None, _internal_call=False):
        if not model_is_sharded(self.model):
            return super().save_model(output_dir, _internal_call)
        state = whole_trained_state(self.model, not isinstance(self.model, PeftModel))  # every process
        self._save(output_dir or self.args.output_dir, state_dict=state)  # process 0 writes

    def _save_optimizer_and_scheduler(self, output_dir):
        if not model_is_sharded(self.model):
            return super()._save_optimizer_and_scheduler(output_dir)
        optimizer = unwrap_optimizer(self.optimizer)
        # every process; the Trainer asks process 0 alone for it
        whole = whole_optimizer_state(optimizer, keep=self.args.should_save)
        optimizer.state_dict = lambda: whole
        try:
            super()._save_optimizer_and_scheduler(output_dir)
        finally:
            del optimizer.state_dict

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.model if model is None else model
        if not model_is_sharded(model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_whole_weights(model, Path(resume_from_checkpoint))

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None or not model_is_sharded(self.model):
            return super()._load_optimizer_and_scheduler(checkpoint)
        optimizer = unwrap_optimizer(self.optimizer)
        optimizer.load_state_dict = lambda state: load_whole_optimizer_state(optimizer, state)
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        finally:
            del optimizer.load_state_dict
