"""What varies between kinds of task, behind one small interface that the training loop and `evaluate`
call: read the data, load the model, batch the data, evaluate at the weights and at posterior draws.

- `ClassifierKind`: GLUE tasks (a sequence-classification head; `data.py`, `predict.py`);
- `CausalLMKind`: causal-LM tuning on prompt/completion or text files (`lm_data.py`, `lm_predict.py`);
- `ChoiceKind`: multiple-choice questions, trained with the completion loss of the right answer and
  scored by the log-likelihood of every choice.

The loss is the model's own in every kind (`model(**batch).loss`: cross-entropy of the labels, over
completion tokens for the decoder LMs), so peft's AdaLoRA adds its orthogonality penalty to it as usual.
Training batches are the Trainer's: a kind gives its encoded training examples (`train_dataset`) and the
collator that pads them; the Trainer weighs a decoder LM's token loss across micro-batches and processes
by the step's token count (`num_items_in_batch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .config import TrainConfig, data_dir_of
from .data import PadBatch, TaskData, check_scorable, encode, load_task_data, make_loader
from .errors import UserError
from .lm_data import (
    ChoiceDataset,
    CompletionDataset,
    PadCompletions,
    completion_loader,
    encode_completions,
    read_choice_file,
    read_completion_file,
)
from .lm_predict import (
    ChoiceSplit,
    choice_rows,
    completion_rows,
    evaluate_causal_lm,
    evaluate_causal_lm_sampled,
    evaluate_choices,
    evaluate_choices_sampled,
)
from .models import (
    attends_causally,
    causal_lm_token_loss,
    check_max_length,
    load_causal_lm,
    load_model,
    loss_type_of,
)
from .predict import evaluate, evaluate_sampled
from .tasks import LMTaskSpec, TaskSpec


class TaskKind(Protocol):
    """What the run and `evaluate` call on a kind of task."""

    spec: TaskSpec | LMTaskSpec

    def read_data(self, config: TrainConfig): ...  # its `.spec`, `.train`, `.dev` (split name -> examples)
    # (tokenizer, model, fresh); without `weights`, the model built empty on the meta device
    def load_model(self, name: str, config: TrainConfig, device: torch.device, weights: bool = True): ...
    def check_processes(self, model, world: int) -> None: ...  # refuse what cannot train on `world` processes
    def collator(self, tokenizer): ...  # the Trainer's data_collator: pads a batch of `train_dataset` rows
    def train_dataset(self, data, tokenizer, config: TrainConfig) -> list[dict]: ...  # encoded, not padded
    def dev_loader(self, dataset, tokenizer, config: TrainConfig): ...
    def evaluate(self, model, loaders: dict, device, autocast) -> dict: ...  # metrics at the weights
    def evaluate_sampled(self, model, loaders: dict, device, autocast, sigma, samples: int, seed: int) -> dict: ...


@dataclass
class RunData:
    """A run's task, training examples and dev splits by name, whatever their kind."""

    spec: LMTaskSpec
    train: object
    dev: dict


class ClassifierKind:
    """GLUE tasks and the user's own labelled data: a sequence classifier (or regressor) over one or two texts."""

    def __init__(self, spec: TaskSpec):
        self.spec = spec

    def read_data(self, config: TrainConfig) -> TaskData:
        """The task's data as the config says, cut to --max-train-samples / --max-eval-samples; `data.spec`
        is the task's (classification on the user's own data: with the classes of the whole training
        file, which this kind then uses)."""
        data = load_task_data(
            config.task, data_dir=data_dir_of(config), train_file=config.train_file,
            validation_file=config.validation_file, text_columns=config.text_columns, label_column=config.label_column,
        )
        self.spec = data.spec
        if config.max_train_samples:
            n = config.max_train_samples
            data.train.texts, data.train.labels = data.train.texts[:n], data.train.labels[:n]
        for ds in data.dev.values():
            if config.max_eval_samples:
                ds.texts, ds.labels = ds.texts[: config.max_eval_samples], ds.labels[: config.max_eval_samples]
            check_scorable(data.spec, ds)
        return data

    def load_model(self, name: str, config: TrainConfig, device: torch.device, weights: bool = True):
        """(tokenizer, model, newly initialised modules), refusing a --max-length past its positions."""
        tokenizer, model, fresh = load_model(name, self.spec, config.trust_remote_code, weights)
        check_max_length(model, name, config.max_length)
        return tokenizer, model, fresh

    def check_processes(self, model, world: int) -> None:
        """A classifier's loss is its micro-batch's mean, which the run weighs as the batch's mean (no token
        count): any model trains on several processes."""

    def collator(self, tokenizer) -> PadBatch:
        """Pads a batch of encoded examples (the Trainer's `data_collator`); labels long, or float for regression."""
        return PadBatch(tokenizer)

    def train_dataset(self, data, tokenizer, config: TrainConfig) -> list[dict]:
        """The training examples, encoded (token ids and labels, not padded), for the Trainer's batches."""
        return encode(data.train, tokenizer, config.max_length)

    def dev_loader(self, dataset, tokenizer, config: TrainConfig):
        return make_loader(encode(dataset, tokenizer, config.max_length), tokenizer,
                           config.per_device_eval_batch_size, False,
                           config.seed)

    def evaluate(self, model, loaders: dict, device, autocast) -> dict:
        return evaluate(model, loaders, self.spec, device, autocast)

    def evaluate_sampled(self, model, loaders: dict, device, autocast, sigma, samples: int, seed: int) -> dict:
        return evaluate_sampled(model, loaders, self.spec, device, autocast, sigma, samples, seed)


class CausalLMKind:
    """Causal-LM tuning: the loss and the metrics count completion tokens (all tokens of a text row)."""

    eos = True  # a completion ends with EOS, so the tuned model learns to stop

    def __init__(self, spec: LMTaskSpec):
        self.spec = spec

    def read_file(self, path: str):
        return read_completion_file(path)

    def read_data(self, config: TrainConfig) -> RunData:
        """--train-file and --validation-file (the decoder-LM tasks read no GLUE folder), cut to
        --max-train-samples / --max-eval-samples."""
        if config.train_file is None or config.validation_file is None:
            raise UserError(f"--task {self.spec.name} reads your own data: give --train-file and --validation-file")
        if config.data_dir:
            raise UserError(f"--data-dir names a GLUE folder; --task {self.spec.name} reads --train-file and "
                            f"--validation-file")
        if config.text_columns or config.label_column:
            raise UserError(f"--text-columns and --label-column are for classification; --task {self.spec.name} "
                            f"reads fixed columns (see README)")
        train, dev = self.read_file(config.train_file), self.read_file(config.validation_file)
        return RunData(self.spec, train.head(config.max_train_samples or len(train)),
                       {self.spec.dev_splits[0]: dev.head(config.max_eval_samples or len(dev))})

    def load_model(self, name: str, config: TrainConfig, device: torch.device, weights: bool = True):
        """(tokenizer, model, newly initialised modules), refusing a --max-length past its positions and a
        model that sees the tokens it is to predict (an encoder such as BERT)."""
        frozen_bf16 = config.bf16 and device.type == "cuda" and config.method_spec.adapter is not None
        tokenizer, model, fresh = load_causal_lm(name, config.trust_remote_code, device, config.load_in,
                                                 bf16_base=frozen_bf16, weights=weights)
        check_max_length(model, name, config.max_length)
        if weights and not attends_causally(model):  # a forward pass: where the weights were read (FSDP's first)
            raise UserError(f"--task {self.spec.name} needs a decoder, and model {name!r} ({model.config.model_type}) "
                            f"attends both ways: it would see each token it is to predict; choose a causal LM "
                            f"(GPT-2, Llama, Qwen2, ...)")
        return tokenizer, model, fresh

    def check_processes(self, model, world: int) -> None:
        """Several processes weigh each one's tokens through transformers' causal-LM loss, which divides by
        `num_items_in_batch` (`loss_kwargs`); a model whose loss is computed otherwise (remote code) would
        fail on that argument, or weigh the processes wrongly, so it is refused there."""
        if world > 1 and not causal_lm_token_loss(model):
            raise UserError(f"--task {self.spec.name} on {world} processes needs a model whose loss is "
                            f"transformers' causal-LM loss, which weighs each process's tokens (this one's loss "
                            f"type is {loss_type_of(model)!r}): train it in one process")

    def collator(self, tokenizer) -> PadCompletions:
        """Pads a batch of `encode_completions` examples (the Trainer integration's default `data_collator`)."""
        return PadCompletions(tokenizer.pad_token_id)

    def training_sequences(self, train) -> CompletionDataset:
        return train

    def train_dataset(self, data: RunData, tokenizer, config: TrainConfig) -> list[dict]:
        """The training sequences, encoded (prompt labels -100, an EOS after each completion where the kind
        trains one), for the Trainer's batches."""
        return list(encode_completions(self.training_sequences(data.train), tokenizer, config.max_length, self.eos))

    def dev_loader(self, dataset, tokenizer, config: TrainConfig):
        encoded = encode_completions(dataset, tokenizer, config.max_length, self.eos)
        return completion_loader(encoded, tokenizer, config.per_device_eval_batch_size, False, config.seed)

    def evaluate(self, model, loaders: dict, device, autocast) -> dict:
        return evaluate_causal_lm(model, loaders, self.spec, device, autocast)

    def evaluate_sampled(self, model, loaders: dict, device, autocast, sigma, samples: int, seed: int) -> dict:
        return evaluate_causal_lm_sampled(model, loaders, self.spec, device, autocast, sigma, samples, seed)

    def prediction_rows(self, model, loader, dataset, device, autocast, sigma=None, samples: int = 0, seed: int = 0):
        """(header, rows) of `evaluate --predictions`: one row per example of `dataset`."""
        return completion_rows(model, loader, device, autocast, sigma, samples, seed)


class ChoiceKind(CausalLMKind):
    """Multiple choice: trained on each question's right answer as a completion (no EOS: the answer is
    scored as it is trained), evaluated by the softmax over the choices' log-likelihoods."""

    eos = False

    def read_file(self, path: str) -> ChoiceDataset:
        return read_choice_file(path)

    def training_sequences(self, train: ChoiceDataset) -> CompletionDataset:
        return train.answer_sequences()

    def dev_loader(self, dataset: ChoiceDataset, tokenizer, config: TrainConfig) -> ChoiceSplit:
        sequences = dataset.choice_sequences()
        return ChoiceSplit(super().dev_loader(sequences, tokenizer, config), sequences.owners,
                           [len(c) for c in dataset.choices], np.asarray(dataset.answers))

    def evaluate(self, model, loaders: dict, device, autocast) -> dict:
        return evaluate_choices(model, loaders, self.spec, device, autocast)

    def evaluate_sampled(self, model, loaders: dict, device, autocast, sigma, samples: int, seed: int) -> dict:
        return evaluate_choices_sampled(model, loaders, self.spec, device, autocast, sigma, samples, seed)

    def prediction_rows(self, model, loader, dataset, device, autocast, sigma=None, samples: int = 0, seed: int = 0):
        return choice_rows(model, loader, dataset.choices, self.spec, device, autocast, sigma, samples, seed)


# a task spec's `kind` -> the class that serves it; a new kind of task is its class here and its specs
KINDS: dict[str, type[TaskKind]] = {"classifier": ClassifierKind, "causal-lm": CausalLMKind,
                                    "multiple-choice": ChoiceKind}


def task_kind(spec: TaskSpec | LMTaskSpec) -> TaskKind:
    """The kind of task `spec` names (`spec.kind`): a classifier (GLUE, or the user's own labelled data),
    causal-lm or multiple-choice."""
    return KINDS[spec.kind](spec)
