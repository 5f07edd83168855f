"""The fast path of peft's AdaLoRA: the same numbers as stock peft (to rounding), fewer kernels a step.

Where peft's AdaLoRA step goes beyond a LoRA step, and what replaces it here:

- the orthogonality penalty (`AdaLoraModel.forward`), a loop of `p @ p.T`, `eye`, subtract and norm
  per matrix, run even when its weight is 0: `orthogonality_penalty`, batched over matrices grouped
  by shape once, and skipped when the weight is 0;
- the adapted layer (`SVDLinear.forward`), which scales the whole (tokens, out) activation by
  `scaling / (ranknum + 1e-5)` twice and then adds it: `FastSVDLinear`, which folds that factor
  into lambda (r numbers) and adds the update inside the second matmul (`addmm_`); peft's own forward
  wherever that does not apply (merged or disabled adapters, several active adapters, dropout) and
  without autograd (evaluation: its numbers stay exactly stock peft's);
- the sensitivity EMAs of `adalora` and `adalora-ivon` (peft's `update_ipt`, every step, ~8 ops per
  matrix): `ForeachSensitivity`, the same operations as foreach ops over all matrices;
- the final phase (peft's `mask_using_rank_pattern`, every step of the last `tfinal` steps: a CPU
  tensor, a blocking copy, `bool`, `not` and `masked_fill` per lambda): `FinalMasks`, the masks
  cached on the device and applied with one `_foreach_mul_`;
- IVON's step: `ivon_inplace.InplaceIVON`; and `erfcx` (the `snr_abs` criterion) is run once here,
  so that CUDA compiles its kernel now and not inside the first allocation step.

`enable_fast_path(model, optimizer)` switches it all on for a built peft model (`enable_fast_model`
the model, `enable_fast_optimizer` the optimizer); the layers and the tuner keep their peft classes as
bases (`isinstance` checks, `save_pretrained` and the adapter format are unchanged). A run's config
decides where it applies (`TrainConfig.fast_path`), wired in `build.py`.
"""

from __future__ import annotations

import ivon
import torch
from peft.tuners.adalora import AdaLoraModel
from peft.tuners.adalora.layer import RankAllocator, SVDLinear, deepspeed_config
from torch import Tensor, nn

from .adapters import SVDLayer, sensitivity_parameters, svd_layers
from .ivon_inplace import InplaceIVON
from .sharding import is_sharded, local_shard, shard_rows

# ---------------------------------------------------------------- the orthogonality penalty


def orthogonality_penalty(groups: list[tuple[list[Tensor], bool]]) -> Tensor:
    """R = mean over matrices M of ||M M^T - I||_F, M = Q (r, in) or P^T (r, out), as peft's AdaLoRA.

    `groups`: (matrices of one shape, transposed): P matrices come as (out, r) with transposed True.
    One stack, one batched matmul, one subtract and one norm per group, whatever the layer count. A matrix
    FSDP sharded by rows is gathered whole first (differentiably; P and Q are the adapter's small factors),
    so every process adds the same penalty, and its gradient reaches each process's rows.
    """
    total, count = None, 0
    for mats, transposed in groups:
        stacked = torch.stack([m.full_tensor() if is_sharded(m) else m for m in mats])
        cov = stacked.transpose(1, 2) @ stacked if transposed else stacked @ stacked.transpose(1, 2)
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        norms = torch.linalg.matrix_norm(cov - eye).sum()
        total = norms if total is None else total + norms
        count += len(mats)
    return total / count


def group_by_shape(layers: list[SVDLayer]) -> list[tuple[list[Tensor], bool]]:
    """The Q and P matrices of every layer, grouped by (factor, shape) for `orthogonality_penalty`."""
    groups: dict[tuple, list[Tensor]] = {}
    for layer in layers:
        for p, transposed in ((layer.Q, False), (layer.P, True)):
            groups.setdefault((transposed, tuple(p.shape)), []).append(p)
    return [(mats, transposed) for (transposed, _), mats in groups.items()]


# ---------------------------------------------------------------- the final-phase masks


class FinalMasks:
    """peft's final rank pattern as 0/1 multipliers of each lambda, on the device, applied in one op (to
    this process's rows of a lambda FSDP sharded)."""

    def __init__(self, layers: list[SVDLayer], rank_pattern: dict):
        self.rank_pattern = rank_pattern  # held, so that its id identifies it while this lives
        self.lambdas, self.masks = [], []
        for layer in layers:
            # peft keys the pattern with the adapter's name in training, without it once loaded from a file
            key = layer.rank_key if layer.rank_key in rank_pattern else layer.saved_rank_key
            start, stop = shard_rows(layer.lam)
            local = local_shard(layer.lam)
            self.lambdas.append(layer.lam)
            self.masks.append(torch.tensor(rank_pattern[key][start:stop], dtype=local.dtype, device=local.device)
                              .unsqueeze(-1))

    def matches(self, rank_pattern: dict, lambdas: list[Tensor]) -> bool:
        return rank_pattern is self.rank_pattern and len(lambdas) == len(self.lambdas) and all(
            a is b for a, b in zip(lambdas, self.lambdas))

    @torch.no_grad()
    def apply(self) -> None:
        torch._foreach_mul_([local_shard(lam) for lam in self.lambdas], self.masks)


# ---------------------------------------------------------------- peft's sensitivity EMAs


class ForeachSensitivity:
    """peft's `RankAllocator.update_ipt` (`adalora`, `adalora-ivon`: every step) as a dozen foreach ops.

    I = |theta * grad|; Ibar <- b1 Ibar + (1 - b1) I; Ubar <- b2 Ubar + (1 - b2) |I - Ibar|, the same
    operations in the same order as peft, so the EMAs are bitwise peft's; kept in peft's dicts
    (`ipt`, `exp_avg_ipt`, `exp_avg_unc`, keyed by parameter name), which checkpoints save. Of a parameter
    FSDP sharded, they hold this process's rows (its shard's gradient is already the mean over processes).
    """

    @torch.no_grad()
    def update_ipt(self, model):
        if deepspeed_config() is not None:  # peft gathers sharded gradients first
            return super().update_ipt(model)
        named = [(n, local_shard(p), local_shard(p.grad)) for n, p in sensitivity_parameters(model, self.adapter_name)]
        for n, p, _ in named:
            if n not in self.ipt:
                self.ipt[n], self.exp_avg_ipt[n], self.exp_avg_unc[n] = (torch.zeros_like(p) for _ in range(3))
        names = [n for n, _, _ in named]
        ipt = torch._foreach_mul([p for _, p, _ in named], [g for _, _, g in named])
        torch._foreach_abs_(ipt)
        avg = [self.exp_avg_ipt[n] for n in names]
        unc = [self.exp_avg_unc[n] for n in names]
        torch._foreach_mul_(avg, self.beta1)
        torch._foreach_add_(avg, torch._foreach_mul(ipt, 1 - self.beta1))
        spread = torch._foreach_sub(ipt, avg)
        torch._foreach_abs_(spread)
        torch._foreach_mul_(spread, 1 - self.beta2)
        torch._foreach_mul_(unc, self.beta2)
        torch._foreach_add_(unc, spread)
        self.ipt.update(zip(names, ipt))


_FOREACH_CLASSES: dict[type, type] = {}


def use_foreach_sensitivity(allocator) -> None:
    """Give an allocator that runs peft's own `update_ipt` the foreach one (same object, a subclass)."""
    cls = type(allocator)
    if cls.update_ipt is not RankAllocator.update_ipt:  # ours already, or one that accumulates nothing
        return
    if cls not in _FOREACH_CLASSES:
        _FOREACH_CLASSES[cls] = type(f"Foreach{cls.__name__}", (ForeachSensitivity, cls), {})
    allocator.__class__ = _FOREACH_CLASSES[cls]


# ---------------------------------------------------------------- the tuner and the layer


class FastAdaLoraModel(AdaLoraModel):
    """peft's AdaLoraModel with the batched penalty and the cached final masks."""

    def svd_layers(self) -> list[SVDLayer]:
        """The trained adapter's layers (cached: the layers and their parameters stay the same objects; not
        once sharded, where FSDP swaps each module's parameters between sharded and gathered ones)."""
        layers = self.__dict__.get("_fast_layers")
        if layers is None:
            layers = svd_layers(self.model, self.trainable_adapter_name)
            if not self.__dict__.get("_fast_sharded"):
                self.__dict__["_fast_layers"] = layers
        return layers

    def forget_layers(self) -> None:
        """For a model FSDP sharded: drop the cached layers, penalty groups and final masks (`fully_shard`
        registered new parameters and freed the old ones' memory), and cache no parameter from now on."""
        for key in ("_fast_layers", "_fast_groups", "_fast_final_masks"):
            self.__dict__.pop(key, None)
        self.__dict__["_fast_sharded"] = True

    def penalty_groups(self) -> list | None:
        """The matrices of the penalty grouped by shape (cached while the parameters stay the same
        objects); None where peft's own loop must run (DeepSpeed ZeRO-3 shards, no AdaLoRA layer)."""
        layers = self.svd_layers()
        params = [layer.Q for layer in layers] + [layer.P for layer in layers]
        cached = self.__dict__.get("_fast_groups")
        if cached is None or len(cached[0]) != len(params) or any(a is not b for a, b in zip(cached[0], params)):
            if not params or any(p.numel() == 0 for p in params):
                return None
            cached = self.__dict__["_fast_groups"] = (params, group_by_shape(layers))
        return cached[1]

    def forward(self, *args, **kwargs):
        adapter = getattr(self, "trainable_adapter_name", None)  # unset for an adapter loaded for inference
        if adapter is None:
            return super().forward(*args, **kwargs)
        weight = self.peft_config[adapter].orth_reg_weight
        groups = self.penalty_groups() if weight > 0 else []
        if groups is None:
            return super().forward(*args, **kwargs)
        outputs = self.model.forward(*args, **kwargs)
        if not isinstance(getattr(outputs, "loss", None), torch.Tensor):
            return outputs
        if weight < 0:
            raise ValueError("orth_reg_weight should be greater than or equal to 0. ")
        if weight > 0:  # at 0 peft adds 0 * penalty: the same loss and gradients as skipping it
            outputs.loss += weight * orthogonality_penalty(groups)
        return outputs

    def update_and_allocate(self, global_step):
        config = self.peft_config[self.trainable_adapter_name]
        if global_step <= config.total_step - config.tfinal:
            use_foreach_sensitivity(self.rankallocator)  # checked every step: an allocator may be installed later
            return super().update_and_allocate(global_step)
        layers = self.svd_layers()
        lambdas = [layer.lam for layer in layers]
        masks = self.__dict__.get("_fast_final_masks")
        if masks is None or not masks.matches(config.rank_pattern, lambdas):
            masks = self.__dict__["_fast_final_masks"] = FinalMasks(layers, config.rank_pattern)
            if not masks.matches(config.rank_pattern, lambdas):  # another layout than the layers': peft's way
                return self.rankallocator.mask_using_rank_pattern(self.model, config.rank_pattern)
        masks.apply()


class FastSVDLinear(SVDLinear):
    """peft's SVDLinear; in training (autograd on), with one active adapter and no dropout, the update
    is `x (Q * lambda * s / (ranknum + 1e-5))^T P^T`, added into the base output by one in-place `addmm_`."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        active = self.active_adapters
        # without autograd (evaluation, prediction) peft's own forward: evaluated metrics, and the saved
        # adapter read back by stock peft, are then exactly stock peft's, not equal to rounding only
        if (not torch.is_grad_enabled() or self.disable_adapters or self.merged or len(active) != 1
                or active[0] not in self.lora_A):
            return super().forward(x, *args, **kwargs)
        name = active[0]
        if not isinstance(self.lora_dropout[name], nn.Identity):
            return super().forward(x, *args, **kwargs)
        lora_A, lora_B, lora_E = self.lora_A[name], self.lora_B[name], self.lora_E[name]
        rows = x.reshape(-1, x.shape[-1])  # (tokens, in): the base output is then a matrix addmm_ can add into
        result = self.base_layer(rows, *args, **kwargs)
        rows = self._cast_input_dtype(rows, lora_A.dtype)
        factor = self.scaling[name] / (self.ranknum[name] + 1e-5)  # on r numbers, not on the activation
        low = nn.functional.linear(rows, lora_A * (lora_E * factor))
        if low.dtype == result.dtype and result.dim() == 2:
            # in-place ops escape autocast: P is cast to the dtype autocast gave `low` (bf16) by hand
            weight = lora_B.t() if lora_B.dtype == low.dtype else lora_B.t().to(low.dtype)
            result.addmm_(low, weight)  # result += low P^T inside the matmul: no pass over the activation
        else:
            result += nn.functional.linear(low, lora_B)  # in place, as peft: result keeps its dtype
        return result.view(*x.shape[:-1], result.shape[-1])


# ---------------------------------------------------------------- switching it on


def warm_up_erfcx(device: torch.device, dtype: torch.dtype) -> None:
    """Run `torch.special.erfcx` once, in the dtype the scores use (at least float32: the CPU has no bf16
    erfcx): on CUDA its first call compiles a kernel (seconds)."""
    torch.special.erfcx(torch.ones(2, device=device, dtype=torch.promote_types(dtype, torch.float32)))


def enable_fast_model(model: nn.Module) -> nn.Module:
    """Switch a built peft AdaLoRA model to the fast path: the tuner becomes a `FastAdaLoraModel`, every
    `SVDLinear` a `FastSVDLinear` (same objects, same parameters, same adapter files). A model without
    AdaLoRA layers is left as it is."""
    tuner = getattr(model, "base_model", None)
    if type(tuner) is AdaLoraModel:
        tuner.__class__ = FastAdaLoraModel
    for module in model.modules():
        if type(module) is SVDLinear:
            module.__class__ = FastSVDLinear
    return model


def enable_fast_optimizer(optimizer):
    """An `ivon.IVON` becomes an `InplaceIVON` (same object, same state_dict) and `erfcx` is warmed up
    on its device; any other optimizer is left as it is. Returns the optimizer."""
    if type(optimizer) is ivon.IVON:
        InplaceIVON.adopt(optimizer)
    if isinstance(optimizer, InplaceIVON):
        warm_up_erfcx(optimizer.flat_device, optimizer.flat_dtype)
    return optimizer


def enable_fast_path(model: nn.Module, optimizer=None):
    """Switch a built peft AdaLoRA model (and its IVON optimizer) to the fast path; returns the optimizer.

    `enable_fast_model(model)`, then `enable_fast_optimizer(optimizer)`: the tuner becomes a
    `FastAdaLoraModel`, every `SVDLinear` a `FastSVDLinear`, an `ivon.IVON` an `InplaceIVON` (same
    objects, same parameters, same adapter files, same state_dict). A model without AdaLoRA layers and
    any other optimizer are left as they are.
    """
    enable_fast_model(model)
    return enable_fast_optimizer(optimizer)
