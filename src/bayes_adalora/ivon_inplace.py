"""IVON (ivon-opt) with sampling, restore and update in place on one flat buffer.

ivon-opt's `IVON` re-points every `p.data` three times a step and concatenates parameters and
gradients into new flat tensors (`torch.cat`). `InplaceIVON` overrides only the three methods that
do this (`_sample_params`, `_restore_param_average`, `_update`): the trained parameters become
views of one flat buffer, and every equation of ivon-opt runs in place on it and on preallocated
buffers, operation for operation as ivon-opt computes it, so the results are bitwise ivon-opt's.

Unchanged: the constructor's arguments, the sampling context manager, `step`, `_sync_samples`, and the
`state_dict` (groups hold `hess` and `momentum`; scratch buffers live outside it), so checkpoints
of either optimizer load into the other.

Guard: anything that reassigns `p.data` (e.g. `model.to(...)`, a posterior draw that forgets to
restore) detaches the parameter from the buffer; every sample and update first checks, and copies
such a parameter's values back into the buffer and re-points it.
"""

from __future__ import annotations

from math import pow

import ivon
import torch
from torch import Tensor

from .sharding import check_row_sharded, gather_rows, local_shard, shard_rows


class InplaceIVON(ivon.IVON):
    """`ivon.IVON` whose parameters are views of one flat buffer, updated in place (same numbers)."""

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        self._flatten()

    @classmethod
    def adopt(cls, optimizer: ivon.IVON) -> InplaceIVON:
        """Turn an existing `ivon.IVON` (state, groups, references held elsewhere) into an InplaceIVON."""
        if type(optimizer) is not ivon.IVON:
            raise TypeError(f"InplaceIVON.adopt takes an ivon.IVON, got {type(optimizer).__name__}")
        optimizer.__class__ = cls
        optimizer._flatten()
        return optimizer

    @property
    def flat_device(self) -> torch.device:
        """Where the parameters' flat buffer (and IVON's state) lives."""
        return self._flat.device

    @property
    def flat_dtype(self) -> torch.dtype:
        return self._flat.dtype

    def state_dict(self) -> dict:
        """ivon-opt's state_dict, with its tensors copied: ours are updated in place, a saved dict must not move."""
        state = super().state_dict()
        for group in state["param_groups"]:
            group["hess"], group["momentum"] = group["hess"].clone(), group["momentum"].clone()
        for key in ("avg_grad", "avg_nxg", "avg_gsq"):
            if isinstance(state["state"].get(key), Tensor):
                state["state"][key] = state["state"][key].clone()
        return state

    # ------------------------------------------------------------ the buffer

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p is not None]

    def _flatten(self) -> None:
        """Copy every parameter into one flat buffer and make it a view of its slice."""
        params = self._params()
        options = dict(device=self._device, dtype=self._dtype)
        self._flat = torch.empty(self._numel, **options)
        self._mean = torch.empty(self._numel, **options)  # the posterior mean while a sample is in place
        self._noise = torch.empty(self._numel, **options)
        self._grad = torch.empty(self._numel, **options)
        self._avg_grad = torch.empty(self._numel, **options)
        self._avg_nxg = torch.empty(self._numel, **options)
        self._scratch = [torch.empty(self._numel, **options) for _ in range(3)]
        self._views, self._grad_views, offset = [], [], 0
        for p in params:
            n = p.numel()
            view = self._flat[offset : offset + n].view(p.shape)
            with torch.no_grad():
                view.copy_(p.data)
            p.data = view
            self._views.append(view)
            self._grad_views.append(self._grad[offset : offset + n].view(p.shape))
            offset += n
        self._group_slices, offset = [], 0
        for group in self.param_groups:
            self._group_slices.append(slice(offset, offset + group["numel"]))
            offset += group["numel"]
        self._ptrs = [v.data_ptr() for v in self._views]

    def _ensure_views(self) -> None:
        """The guard: a parameter whose `.data` was reassigned is copied back into its slice and re-pointed."""
        params = self._params()
        if [p.data_ptr() for p in params] == self._ptrs:
            return
        with torch.no_grad():
            for p, view in zip(params, self._views):
                if p.data_ptr() != view.data_ptr():
                    view.copy_(p.data)
                    p.data = view

    # ------------------------------------------------------------ ivon-opt's three methods, in place

    @torch.no_grad()
    def _sample_params(self) -> tuple[Tensor, Tensor]:
        """mean <- theta; theta <- theta + eps / sqrt(ess (h + wd)), eps ~ N(0, I) drawn per group as ivon-opt
        draws it."""
        self._ensure_views()
        denominator = self._scratch[0]
        for index, (group, part) in enumerate(zip(self.param_groups, self._group_slices)):
            noise, denom = self._noise[part], denominator[part]
            self._draw_noise(index, group, noise)
            torch.add(group["hess"], group["weight_decay"], out=denom)
            denom.mul_(group["ess"]).sqrt_()
            noise.div_(denom)
        self._mean.copy_(self._flat)
        self._flat.add_(self._noise)
        self._push()
        return self._mean, self._noise

    def _draw_noise(self, index: int, group: dict, out: Tensor) -> None:
        """eps ~ N(0, I) for group `index`, into `out` (ivon-opt's draw: one randn of the group's size)."""
        torch.randn(group["numel"], out=out)

    def _push(self) -> None:
        """After the buffer changed: nothing (the parameters are views of it); `ShardedIVON` copies it out."""

    def _local_grads(self) -> list[Tensor | None]:
        return [p.grad if p.requires_grad else None for p in self._params()]

    @torch.no_grad()
    def _restore_param_average(self, train: bool, param_avg: Tensor, noise: Tensor) -> None:
        """theta <- mean; with `train`, Welford means of the gradient and of noise * gradient."""
        self._ensure_views()
        self._flat.copy_(param_avg)
        self._push()
        if not train:
            return
        grads = self._local_grads()
        if any(g is None for g in grads):  # ivon-opt counts a frozen parameter's gradient as zeros
            for view, g in zip(self._grad_views, grads):
                if g is None:
                    view.zero_()
            pairs = [(v, g) for v, g in zip(self._grad_views, grads) if g is not None]
            if pairs:
                torch._foreach_copy_([v for v, _ in pairs], [g for _, g in pairs])
        else:
            torch._foreach_copy_(self._grad_views, grads)
        count = self.state["count"] + 1
        self.state["count"] = count
        self.state["avg_grad"] = self._welford_mean_(self.state["avg_grad"], self._avg_grad, self._grad, count)
        if self.hess_approx == "price":
            torch.mul(noise, self._grad, out=self._scratch[1])
            self.state["avg_nxg"] = self._welford_mean_(self.state["avg_nxg"], self._avg_nxg, self._scratch[1], count)
        elif self.hess_approx == "gradsq":
            torch.square(self._grad, out=self._scratch[1])
            self.state["avg_gsq"] = self._welford_mean_(self.state["avg_gsq"], self._avg_nxg, self._scratch[1], count)

    def _welford_mean_(self, avg: Tensor | None, buffer: Tensor, new: Tensor, count: int) -> Tensor:
        """avg + (new - avg) / count into `buffer` (new itself for the first sample), as ivon-opt's `_welford_mean`."""
        if avg is None:
            return buffer.copy_(new)
        delta = torch.sub(new, avg, out=self._scratch[2])
        delta.div_(count)
        return avg.add_(delta)

    @torch.no_grad()
    def _update(self) -> None:
        """ivon-opt's `_new_momentum`, `_new_hess`, `_new_param_averages`, in place, per group."""
        self._ensure_views()
        self.current_step += 1
        for group, part in zip(self.param_groups, self._group_slices):
            lr, b1, b2, wd, ess = group["lr"], group["beta1"], group["beta2"], group["weight_decay"], group["ess"]
            mean, m, h = self._flat[part], group["momentum"], group["hess"]
            a, b, c = (s[part] for s in self._scratch)
            avg_grad = self.state["avg_grad"][part]
            # m <- b1 m + (1 - b1) g
            torch.mul(avg_grad, 1.0 - b1, out=a)
            m.mul_(b1).add_(a)
            # f = ess (h + wd) nxg (price) or ess gsq; h <- b2 h + (1 - b2) f + (1 - b2)^2 / 2 (h - f)^2 / (h + wd)
            torch.add(h, wd, out=a)
            if self.hess_approx == "price":
                torch.mul(self.state["avg_nxg"][part], a, out=b)
            else:
                b.copy_(self.state["avg_gsq"][part])
            b.mul_(ess)
            torch.sub(h, b, out=c)
            c.square_().mul_(0.5 * (1 - b2) ** 2).div_(a)
            b.mul_(1.0 - b2)
            h.mul_(b2).add_(b).add_(c)
            # mean <- mean - lr' clip((m / debias + wd mean) / (h + wd), +-radius)
            step_lr = lr * (group["hess_init"] + wd) if self.rescale_lr else lr
            debias = 1.0 - pow(b1, float(self.current_step)) if self.debias else 1.0
            torch.div(m, debias, out=a)
            torch.mul(mean, wd, out=b)
            a.add_(b)
            torch.add(h, wd, out=b)
            a.div_(b).clamp_(min=-group["clip_radius"], max=group["clip_radius"]).mul_(step_lr)
            mean.sub_(a)
        self._push()


class ShardedIVON(InplaceIVON):
    """`InplaceIVON` over parameters that FSDP2's `fully_shard` sharded by rows (DTensors): its flat buffer,
    momentum and Hessian hold this process's rows only, beside them; nothing is gathered for a step.

    - FSDP owns the shards' memory (it gathers the layers from it), so the parameters are not re-pointed at
      the buffer: the buffer is read from the shards before each of ivon-opt's three methods and written
      back after (`_ensure_views`, `_push`), a copy of this process's rows of the adapter.
    - The gradients FSDP leaves are each shard's rows of the mean over the processes (its reduce-scatter),
      so there is nothing for IVON to sync: `sync` is off.
    - The noise: every process draws each group's whole noise vector from the same stream and keeps its rows'
      entries, so the draws are those of one process holding every parameter; with the same batches, one
      process and several train the same posterior.
    Plain (unsharded) parameters are their own shard, so one process runs it too, with InplaceIVON's numbers.
    """

    def __init__(self, params, *args, **kwargs):
        kwargs["sync"] = False
        super().__init__(params, *args, **kwargs)

    def _get_param_configs(self):
        """ivon-opt's sizes, counted over this process's rows; each group's whole size kept as `global_numel`."""
        params = self._params()
        for p in params:
            check_row_sharded(p)
        for group in self.param_groups:
            kept = [p for p in group["params"] if p is not None]
            group["numel"] = sum(local_shard(p).numel() for p in kept)
            group["global_numel"] = sum(p.numel() for p in kept)
        if not params:
            return 0, torch.device("cpu"), torch.get_default_dtype()
        locals_ = [local_shard(p) for p in params]
        devices, dtypes = {t.device for t in locals_}, {t.dtype for t in locals_}
        if len(devices) > 1 or len(dtypes) > 1:
            raise ValueError(f"the parameters' shards are on several devices or dtypes: {devices}, {dtypes}")
        return sum(g["numel"] for g in self.param_groups), devices.pop(), dtypes.pop()

    def _flatten(self) -> None:
        """The buffers over this process's rows, and where each of its entries sits in its group's whole vector."""
        options = dict(device=self._device, dtype=self._dtype)
        self._flat = torch.empty(self._numel, **options)
        self._mean = torch.empty(self._numel, **options)
        self._noise = torch.empty(self._numel, **options)
        self._grad = torch.empty(self._numel, **options)
        self._avg_grad = torch.empty(self._numel, **options)
        self._avg_nxg = torch.empty(self._numel, **options)
        self._scratch = [torch.empty(self._numel, **options) for _ in range(3)]
        self._views, self._grad_views, self._noise_index, offset = [], [], [], 0
        self._group_slices, group_offset = [], 0
        for group in self.param_groups:
            index, whole_offset = [], 0
            for p in group["params"]:
                if p is None:
                    continue
                local = local_shard(p)
                n = local.numel()
                self._views.append(self._flat[offset : offset + n].view(local.shape))
                self._grad_views.append(self._grad[offset : offset + n].view(local.shape))
                start, _ = shard_rows(p)
                row = p.numel() // p.shape[0] if p.dim() else 1
                index.append(torch.arange(whole_offset + start * row, whole_offset + start * row + n))
                whole_offset += p.numel()
                offset += n
            self._noise_index.append(torch.cat(index).to(self._device) if index else torch.zeros(0, dtype=torch.long))
            self._group_slices.append(slice(group_offset, group_offset + group["numel"]))
            group_offset += group["numel"]
        self._ensure_views()

    def _locals(self) -> list[Tensor]:
        return [local_shard(p) for p in self._params()]

    def _ensure_views(self) -> None:
        """The buffer := the shards (what FSDP, a checkpoint load or the user last wrote)."""
        if self._views:
            torch._foreach_copy_(self._views, self._locals())

    def _push(self) -> None:
        """The shards := the buffer."""
        if self._views:
            torch._foreach_copy_(self._locals(), self._views)

    def _local_grads(self) -> list[Tensor | None]:
        return [local_shard(p.grad) if p.requires_grad and p.grad is not None else None for p in self._params()]

    def _draw_noise(self, index: int, group: dict, out: Tensor) -> None:
        """The group's whole draw, as one process makes it, of which this process keeps its rows' entries."""
        whole = torch.randn(group["global_numel"], device=out.device, dtype=out.dtype)
        torch.index_select(whole, 0, self._noise_index[index], out=out)

    # ------------------------------------------------------------ checkpoints: the whole state

    _FLAT_STATE = ("avg_grad", "avg_nxg", "avg_gsq")  # over every group's parameters, between samples and a step

    def whole_state_dict(self) -> dict:
        """The state_dict of one process holding every parameter whole: IVON's Hessian and momentum (and any
        gradient average held between samples and a step) gathered from every process's rows, so a checkpoint
        holds what an unsharded `InplaceIVON` saves, and `load_state_dict` reads it back on any number of
        processes. Every process must call it (a collective)."""
        state = self.state_dict()
        for group, saved in zip(self.param_groups, state["param_groups"]):
            for key in ("hess", "momentum"):
                saved[key] = _gather_flat(_kept(group["params"]), saved[key])
            saved["numel"] = group["global_numel"]
        for key in self._FLAT_STATE:
            if isinstance(state["state"].get(key), Tensor):
                state["state"][key] = _gather_flat(self._params(), state["state"][key])
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Read a state_dict of this process's rows, or a whole one (`whole_state_dict`, or an unsharded
        IVON's), of which this process keeps its rows."""
        state_dict = {**state_dict, "param_groups": [dict(g) for g in state_dict["param_groups"]],
                      "state": dict(state_dict["state"])}
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            params = _kept(group["params"])
            for key in ("hess", "momentum"):
                saved[key] = _rows_of_whole(params, saved[key])
            saved["numel"], saved["global_numel"] = group["numel"], group["global_numel"]
        for key in self._FLAT_STATE:
            if isinstance(state_dict["state"].get(key), Tensor):
                state_dict["state"][key] = _rows_of_whole(self._params(), state_dict["state"][key])
        super().load_state_dict(state_dict)


def _kept(params) -> list[Tensor]:
    return [p for p in params if p is not None]


def _gather_flat(params: list[Tensor], flat: Tensor) -> Tensor:
    """The whole flat vector over `params` of which `flat` holds this process's rows of each (a collective)."""
    parts, offset = [], 0
    for p in params:
        local = local_shard(p)
        parts.append(gather_rows(p, flat[offset : offset + local.numel()].view(local.shape)).reshape(-1))
        offset += local.numel()
    return torch.cat(parts) if parts else flat


def _rows_of_whole(params: list[Tensor], flat: Tensor) -> Tensor:
    """This process's rows of each of `params` in `flat`, when `flat` is the whole vector over them (else
    `flat`: already this process's rows)."""
    whole = sum(p.numel() for p in params)
    if flat.numel() != whole or whole == sum(local_shard(p).numel() for p in params):
        return flat
    parts, offset = [], 0
    for p in params:
        start, stop = shard_rows(p)
        parts.append(flat[offset : offset + p.numel()].view(p.shape)[start:stop].reshape(-1))
        offset += p.numel()
    return torch.cat(parts)
