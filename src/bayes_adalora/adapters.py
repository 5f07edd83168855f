"""The one module that knows peft's adapter layout: AdaLoRA's P, lambda, Q per layer, the rank pattern,
parameter-name prefixes, the saved adapter's trimmed shapes and the posterior file's keys.

peft names AdaLoRA's factors of W + P diag(lambda) Q after LoRA's: `lora_B` is P (out x r),
`lora_E` is lambda (r x 1), `lora_A` is Q (r x in), each a dict keyed by the adapter's name. Its
rank pattern is keyed `<module>.lora_E.<adapter>` in training and `<module>.lora_E` in the saved
adapter_config.json; a saved adapter holds only the kept triplets, under
`base_model.model.<module>.<factor>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import AdaLoraConfig, PeftModel, set_peft_model_state_dict
from peft.tuners.adalora import AdaLoraLayer, AdaLoraModel
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from .errors import UserError
from .posterior import hessian_views, posterior_sigma_from_hessian
from .sharding import all_sum, gather_rows, is_sharded, local_shard, shard_rows

BASE_PREFIX = "base_model.model."  # a PeftModel's parameter names start with it
FACTORS = {"lora_B": "P", "lora_E": "λ", "lora_A": "Q"}  # peft's name -> the paper's, in triplet order
POSTERIOR_FILE = "posterior.safetensors"


@dataclass(frozen=True)
class SVDLayer:
    """One AdaLoRA layer's triplets for one adapter: P (out x r), lambda (r x 1), Q (r x in)."""

    name: str  # the module's name in the model it was found in
    adapter: str
    P: nn.Parameter
    lam: nn.Parameter
    Q: nn.Parameter

    @property
    def r(self) -> int:
        return self.lam.shape[0]

    @property
    def rank_key(self) -> str:
        """Its key in peft's rank pattern during training."""
        return self.param_name("lora_E")

    @property
    def saved_rank_key(self) -> str:
        """Its key in peft's rank pattern as saved in adapter_config.json (no adapter name)."""
        return f"{self.name}.lora_E"

    def param_name(self, factor: str) -> str:
        """The parameter name of `factor` (lora_A, lora_B or lora_E), as peft's allocator keys its EMAs."""
        return f"{self.name}.{factor}.{self.adapter}"


def svd_layers(model: nn.Module, adapter: str) -> list[SVDLayer]:
    """Every AdaLoRA layer of `model` training `adapter`, in the model's order."""
    return [
        SVDLayer(name, adapter, m.lora_B[adapter], m.lora_E[adapter], m.lora_A[adapter])
        for name, m in model.named_modules()
        if isinstance(m, AdaLoraLayer) and adapter in m.lora_E
    ]


def sensitivity_parameters(model: nn.Module, adapter: str) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs whose sensitivity peft's `RankAllocator.update_ipt` tracks: its own rule,
    every parameter whose name holds "lora_" and the adapter's name, so the EMAs are keyed as peft keys them."""
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n and adapter in n]


def adalora_tuner(model: nn.Module) -> AdaLoraModel:
    """The peft `AdaLoraModel` inside `model` (a `PeftModel`, possibly wrapped for data parallelism)."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    tuner = model.base_model if isinstance(model, PeftModel) else None
    if not isinstance(tuner, AdaLoraModel):
        raise ValueError(
            "rank allocation needs a peft AdaLoRA model (get_peft_model with an AdaLoraConfig), "
            f"got {type(model).__name__}"
        )
    return tuner


def adalora_settings(tuner: AdaLoraModel) -> AdaLoraConfig:
    """The trained adapter's `AdaLoraConfig` (its budget, phases, penalty weight and rank pattern)."""
    return tuner.peft_config[tuner.trainable_adapter_name]


def rank_allocator(tuner: AdaLoraModel):
    """peft's `RankAllocator` of the tuner (or the one `allocator.install_allocator` put in its place)."""
    return tuner.rankallocator


def rank_pattern(tuner: AdaLoraModel) -> dict | None:
    """The rank pattern of the last masking (None before the first)."""
    return adalora_settings(tuner).rank_pattern


def set_rank_pattern(tuner: AdaLoraModel, pattern: dict | None) -> None:
    adalora_settings(tuner).rank_pattern = pattern


def remask(tuner: AdaLoraModel) -> None:
    """Apply the tuner's rank pattern to its lambdas (a no-op before the first mask); of lambdas FSDP sharded,
    to this process's rows."""
    pattern = rank_pattern(tuner)
    if not pattern:
        return
    layers = svd_layers(tuner.model, tuner.trainable_adapter_name)
    if not any(is_sharded(layer.lam) for layer in layers):
        rank_allocator(tuner).mask_using_rank_pattern(tuner.model, pattern)
        return
    with torch.no_grad():
        for layer in layers:
            start, stop = shard_rows(layer.lam)
            local = local_shard(layer.lam)
            kept = pattern[layer.rank_key if layer.rank_key in pattern else layer.saved_rank_key][start:stop]
            local.mul_(torch.tensor(kept, dtype=local.dtype, device=local.device).unsqueeze(-1))


PAPER_LAMBDA_STD = 0.02  # peft 0.11, which the paper ran, drew lambda from N(0, 0.02); peft >= 0.12 starts it at 0


@torch.no_grad()
def init_lambdas_normal(model: nn.Module, std: float) -> None:
    """Every AdaLoRA lambda of `model` drawn from N(0, std^2) (the global torch RNG: the seed decides it)."""
    for m in model.modules():
        if isinstance(m, AdaLoraLayer):
            for lam in m.lora_E.values():
                nn.init.normal_(lam, mean=0.0, std=std)


def lambda_parameters(model: nn.Module) -> set[int]:
    """ids of every AdaLoRA lambda in `model` (a pruned triplet is a lambda that is exactly 0)."""
    return {id(p) for m in model.modules() if isinstance(m, AdaLoraLayer) for p in m.lora_E.values()}


def adapter_ranks(model: nn.Module) -> dict[str, int]:
    """Rank per adapted matrix of a PeftModel: AdaLoRA's unmasked triplets, or LoRA's r. (Under FSDP every
    process must call it: the counts of the lambdas' rows are summed over the processes.)"""
    adapter = model.active_adapter
    counts, fixed = {}, {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, AdaLoraLayer):
            counts[name] = module.lora_E[adapter]
        elif isinstance(module, LoraLayer):
            fixed[name] = int(module.r[adapter])
    if counts:
        lambdas = list(counts.values())
        nonzero = all_sum(torch.stack([(local_shard(lam) != 0).sum() for lam in lambdas]), lambdas)
        counts = dict(zip(counts, map(int, nonzero.tolist())))
    return {**counts, **fixed}


def parameter_module(name: str) -> tuple[str, str]:
    """(module, role) of a trained parameter's name: role P, λ or Q for an adapter factor, "head" for
    a module trained in full (`<module>.modules_to_save.<adapter>.<weight|bias>`)."""
    parts = name.removeprefix(BASE_PREFIX).split(".")
    factor = next((f for f in FACTORS if f in parts), None)
    if factor is not None:
        return ".".join(parts[: parts.index(factor)]), FACTORS[factor]
    cut = parts.index("modules_to_save") if "modules_to_save" in parts else len(parts) - 1
    return ".".join(parts[:cut]), "head"


# ----------------------------------------------------------------------------- the saved adapter


def load_adapter_weights(model: nn.Module, adapter_dir: Path) -> None:
    """Load peft's saved adapter into `model`, built as in training (AdaLoRA at its initial rank).

    peft saves an AdaLoRA adapter cut to its kept triplets (`rank_pattern`); they are put back at
    their places and the pruned ones are zeros, as lambda is in the trained model.
    """
    try:
        state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    except (SafetensorError, OSError):
        raise damaged_file(adapter_dir / "adapter_model.safetensors") from None
    try:
        saved_config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
        pattern = saved_config.get("rank_pattern") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, OSError):
        raise damaged_file(adapter_dir / "adapter_config.json") from None
    for name, keep in pattern.items():  # "<module>.lora_E": one flag per initial triplet
        kept = torch.tensor(keep, dtype=torch.bool).nonzero()[:, 0]
        prefix = f"{BASE_PREFIX}{name.rsplit('.', 1)[0]}"
        for factor, dim in (("lora_E", 0), ("lora_A", 0), ("lora_B", 1)):
            saved = state[f"{prefix}.{factor}"]
            shape = list(saved.shape)
            shape[dim] = len(keep)
            state[f"{prefix}.{factor}"] = saved.new_zeros(shape).index_copy_(dim, kept, saved)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    loaded = set_peft_model_state_dict(model, state)
    missing = sorted(trained & set(loaded.missing_keys))
    if loaded.unexpected_keys or missing:
        raise UserError(f"the adapter in {adapter_dir} does not fit the run's model "
                        f"({(loaded.unexpected_keys or missing)[0]} does not match)")


# ----------------------------------------------------------------------------- the posterior file


def posterior_state_dict(optimizer, names: dict[nn.Parameter, str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata for posterior.safetensors.

    For every named parameter: `<name>.mean`, `<name>.hess` and `<name>.sigma`; metadata holds the
    `ess` and `weight_decay` that turn the Hessian into sigma, so either can be used. Under FSDP every
    process must call it: each sharded tensor is gathered whole from its rows.
    """
    tensors: dict[str, Tensor] = {}
    meta: dict[str, str] = {}
    for p, h, group in hessian_views(optimizer):  # of a sharded parameter, gathered whole (every process calls)
        name = names[p]
        h = gather_rows(p, h.detach())
        tensors[f"{name}.mean"] = gather_rows(p, local_shard(p).detach()).float().contiguous().cpu()
        tensors[f"{name}.hess"] = h.float().contiguous().cpu()
        tensors[f"{name}.sigma"] = (
            posterior_sigma_from_hessian(h, group["ess"], group["weight_decay"]).float().contiguous().cpu()
        )
        meta["ess"] = repr(float(group["ess"]))
        meta["weight_decay"] = repr(float(group["weight_decay"]))
    return tensors, meta


def read_posterior(path: Path, kind: str) -> dict[str, Tensor]:
    """posterior.safetensors' `<name>.<kind>` tensors (kind: mean, hess, sigma) by parameter name."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k.removesuffix(f".{kind}"): f.get_tensor(k) for k in f.keys() if k.endswith(f".{kind}")}  # noqa: SIM118
    except (SafetensorError, OSError):
        raise damaged_file(path) from None


def load_posterior_sigma(folder: str | Path, model: nn.Module) -> dict[str, Tensor]:
    """IVON's posterior sigma for every parameter of `model` that training trained, by name, from `folder`'s
    posterior.safetensors: a run's folder, or an exported adapter, which `model` may have been loaded from
    with stock peft (`PeftModel.from_pretrained(base, folder)`).

    The file holds the training shapes (AdaLoRA at its initial rank); where `model`'s adapter is cut to
    its kept triplets, as stock peft loads a saved AdaLoRA adapter, sigma is cut by the folder's
    `rank_pattern` with peft's own `resize_state_dict_by_rank_pattern`, as peft cut the weights.
    """
    folder = Path(folder)
    if not (folder / POSTERIOR_FILE).is_file():
        raise UserError(f"{folder} has no {POSTERIOR_FILE}: there is no posterior to draw from")
    sigma = read_posterior(folder / POSTERIOR_FILE, "sigma")
    params = dict(model.named_parameters())  # stock peft loads an adapter frozen: every parameter, by name
    cut = {}
    if isinstance(getattr(model, "base_model", None), AdaLoraModel) and (folder / "adapter_config.json").is_file():
        try:
            pattern = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("rank_pattern")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, OSError):
            raise damaged_file(folder / "adapter_config.json") from None
        if pattern:
            try:
                cut = model.base_model.resize_state_dict_by_rank_pattern(pattern, dict(sigma), model.active_adapter)
            except KeyError as err:
                raise UserError(f"{folder / POSTERIOR_FILE} does not fit the adapter's rank pattern "
                                f"(no sigma for {err.args[0]})") from None
    missing = sorted(set(sigma) - set(params))
    if missing:
        raise UserError(f"{folder / POSTERIOR_FILE} does not fit the model (it has no parameter {missing[0]})")
    out = {}
    for name in sigma:
        fitting = [s for s in (sigma[name], cut.get(name)) if s is not None and s.shape == params[name].shape]
        if not fitting:
            raise UserError(f"{folder / POSTERIOR_FILE} does not fit the model (no sigma of shape "
                            f"{tuple(params[name].shape)} for {name})")
        out[name] = fitting[0]
    return out


def damaged_file(path: Path) -> UserError:
    """The refusal of a saved run's file that cannot be read."""
    return UserError(f"{path} is damaged (it cannot be read): train the run again, or restore the file")
