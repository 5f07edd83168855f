"""PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`) for the models trained here.

`fully_shard` turns every parameter into a `DTensor` sharded by rows (`Shard(0)` over the processes):
each process keeps rows `[start, stop)` of it (torch.chunk's split: ceil(rows / processes) rows each, the
last processes fewer or none). What reads the trained parameters by value (IVON, the rank allocation, the
posterior file) reads its own rows through `local_shard` and `shard_rows`, and a value that must be whole
(the posterior file, the rank pattern's scores) is gathered once by `gather_rows` or summed by `all_sum`.
A plain parameter (no sharding, one process or DDP) is its own shard, rows `[0, rows)`, and the
collectives are no-ops, so one code path serves both.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _dtensor():
    from torch.distributed.tensor import DTensor, Shard

    return DTensor, Shard


def is_sharded(p: Tensor) -> bool:
    """Whether `p` is a DTensor (a parameter `fully_shard` sharded)."""
    DTensor, _ = _dtensor()
    return isinstance(p, DTensor)


def check_row_sharded(p: Tensor, name: str = "a parameter") -> None:
    """Refuse a DTensor that is not FSDP2's row sharding (one mesh dimension, `Shard(0)`)."""
    _, Shard = _dtensor()
    if is_sharded(p) and (p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),)):
        raise ValueError(f"{name} is sharded as {tuple(p.placements)} over a {p.device_mesh.ndim}-D mesh; "
                         f"IVON and the rank allocation read FSDP2's row sharding (Shard(0) over one mesh dimension)")


def local_shard(p: Tensor) -> Tensor:
    """This process's rows of `p` (a DTensor's local tensor; a plain tensor is whole here), sharing its memory:
    writing into it writes the parameter."""
    return p.to_local() if is_sharded(p) else p.data


def shard_rows(p: Tensor) -> tuple[int, int]:
    """The global rows `[start, stop)` of dim 0 that this process holds (all of them for a plain tensor)."""
    rows = p.shape[0] if p.dim() else 1
    if not is_sharded(p):
        return 0, rows
    check_row_sharded(p)
    mesh = p.device_mesh
    chunk = -(-rows // mesh.size())  # torch.chunk's chunk size, which Shard(0) follows
    start = min(mesh.get_local_rank() * chunk, rows)
    return start, start + (local_shard(p).shape[0] if p.dim() else 1)


def gather_rows(p: Tensor, local: Tensor) -> Tensor:
    """The whole tensor of which `local` holds this process's rows, sharded like `p` (every process must call
    it: it is a collective); `local` itself for a plain `p`."""
    if not is_sharded(p):
        return local
    DTensor, _ = _dtensor()
    return DTensor.from_local(local.contiguous(), p.device_mesh, p.placements, run_check=False, shape=p.shape,
                              stride=p.stride()).full_tensor()


def rows_like(p: Tensor, whole: Tensor) -> Tensor:
    """`whole` (a tensor of `p`'s shape) sharded as `p` is: a DTensor of a copy of this process's rows of it, on
    `p`'s device; `whole` itself for a plain `p` or a tensor of another shape (a step count)."""
    if not is_sharded(p) or tuple(whole.shape) != tuple(p.shape):
        return whole
    DTensor, _ = _dtensor()
    start, stop = shard_rows(p)
    local = whole[start:stop].to(device=local_shard(p).device).clone()  # a copy: `whole` is not kept alive
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def copy_rows(target: Tensor, whole: Tensor) -> None:
    """Write `whole` (a tensor of `target`'s shape) into `target`: of a DTensor, this process's rows of it."""
    start, stop = shard_rows(target)
    local_shard(target).copy_(whole[start:stop] if is_sharded(target) else whole)


def all_sum(value: Tensor, params) -> Tensor:
    """`value` summed over the processes that share the sharding of `params` (in place); as it is when no
    parameter is sharded."""
    mesh = next((p.device_mesh for p in params if is_sharded(p)), None)
    if mesh is not None:
        torch.distributed.all_reduce(value, group=mesh.get_group())
    return value


def model_is_sharded(model: nn.Module) -> bool:
    return any(is_sharded(p) for p in model.parameters())


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: by the class names transformers gives FSDP to wrap (`_no_split_modules`:
    `LlamaDecoderLayer`, `GPT2Block`, ...), else (encoders such as BERT and DeBERTa name none) the modules of
    its largest list of same-class modules (`encoder.layer`)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    named = [m for m in model.modules() if type(m).__name__ in names]
    if named:
        return named
    lists = [m for m in model.modules()
             if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(child) for child in m}) == 1]
    if not lists:
        return []
    return list(max(lists, key=lambda blocks: sum(p.numel() for p in blocks.parameters())))


def shard_model(model: nn.Module, mesh=None, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 over `model`: each transformer block sharded on its own (gathered only while it runs), then the
    rest at the root; in place, and returned. `mesh`: a 1-D device mesh (default: every process);
    `reshard_after_forward` False keeps each block gathered from its forward to its backward (FSDP's
    SHARD_GRAD_OP)."""
    from torch.distributed.fsdp import fully_shard

    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no transformer block to shard (its _no_split_modules)")
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    for module in model.modules():  # what cached the parameters fully_shard replaced (the fast path's layers)
        if hasattr(module, "forget_layers"):
            module.forget_layers()
    return model


def reshard(model: nn.Module) -> None:
    """Free the whole weights FSDP gathered for a forward that no backward followed (an evaluation): with
    `reshard_after_forward` False (shard_grad_op) they stay gathered, and the model's parameters are then
    whole ones, not the shards IVON and the allocation hold. A model not sharded is left as it is."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def process_mesh(device: torch.device):
    """A 1-D device mesh over every process, on `device`'s type (not the machine's default accelerator: a CPU run
    on a machine with GPUs shards on the CPU)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def first_process_value(value):
    """`value` as the first process holds it, in every process (a collective)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_from_first_process(model: nn.Module, device: torch.device, reshard_after_forward: bool = True) -> nn.Module:
    """`shard_model`, where the first process built `model` with its values (on the CPU) and the others built it
    empty, on the meta device (no weight read: the whole model is the first process's alone, in its CPU memory):
    each process then receives its rows from the first (`fill_from_first_process`), on `device`. What trains is
    the first process's choice too (peft's move of an adapter onto the meta device makes AdaLoRA's frozen rank
    count trainable). Every process must call it."""
    trained = first_process_value({n for n, p in model.named_parameters() if p.requires_grad})
    for name, p in model.named_parameters():
        p.requires_grad_(name in trained)
    empty = any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    # the first process's tensors (adapter, new head and the buffers a state dict leaves out included), kept by
    # name while FSDP shards them; detached, so they keep the CPU memory when FSDP moves each block's `.data`
    whole = None if empty else {n: t.detach() for n, t in (*model.named_parameters(), *model.named_buffers())}
    shard_model(model, mesh=process_mesh(device), reshard_after_forward=reshard_after_forward)
    if empty:
        model.to_empty(device=device)
    fill_from_first_process(model, whole, device)
    return model


def fill_from_first_process(model: nn.Module, whole: dict[str, Tensor] | None, device: torch.device) -> None:
    """Give a model FSDP sharded the first process's values: `whole` is the first process's parameters and
    buffers by name from before sharding (the others pass None). One tensor at a time, in the same order
    everywhere: the first process sends it whole (and lets it go), each process keeps its rows. Every process
    must call it."""
    import torch.distributed as dist

    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for name, target in targets.items():
            if whole is not None:
                value = whole.pop(name).detach().to(device)
            else:
                value = torch.empty(target.shape, dtype=target.dtype, device=device)
            dist.broadcast(value, src=0)
            copy_rows(target, value)
            del value
