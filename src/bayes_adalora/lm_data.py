"""Data of the decoder-LM tasks: reading causal-LM and multiple-choice files, turning them into token
sequences whose loss counts the completion only, and batching them.

A causal-LM example is a prompt and a completion (a `text` row: an empty prompt). A multiple-choice
question is scored, and trained, through the same sequences: prompt `"{question}\\nAnswer:"`,
completion `" {choice}"`. Mistakes in a file raise one `UserError` sentence naming the file and line.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import make_loader, normal_text, read_records
from .errors import UserError
from .lm_metrics import IGNORE_INDEX

QUESTION_TEMPLATE = "{question}\nAnswer:"
CHOICE_TEMPLATE = " {choice}"
CAUSAL_LM_FILES = (".jsonl", ".json", ".csv", ".tsv")
CHOICE_FILES = (".jsonl", ".json")  # `choices` is a list: JSON only


@dataclass
class CompletionDataset:
    """Prompt/completion pairs; the loss and the metrics count the completion's tokens only.

    `owners[i]`: for choice sequences, the question that sequence i scores a choice of.
    """

    prompts: list[str]
    completions: list[str]
    source: str
    owners: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.completions)

    def head(self, n: int) -> CompletionDataset:
        return CompletionDataset(self.prompts[:n], self.completions[:n], self.source, self.owners[:n])


@dataclass
class ChoiceDataset:
    """Multiple-choice questions: `choices[i]` (2 or more strings) and the index of the right one."""

    questions: list[str]
    choices: list[list[str]]
    answers: list[int]
    source: str

    def __len__(self) -> int:
        return len(self.answers)

    def head(self, n: int) -> ChoiceDataset:
        return ChoiceDataset(self.questions[:n], self.choices[:n], self.answers[:n], self.source)

    def answer_sequences(self) -> CompletionDataset:
        """What training reads: each question with its right answer as the completion."""
        return CompletionDataset([QUESTION_TEMPLATE.format(question=q) for q in self.questions],
                                 [CHOICE_TEMPLATE.format(choice=c[a]) for c, a in zip(self.choices, self.answers)],
                                 self.source)

    def choice_sequences(self) -> CompletionDataset:
        """What scoring reads: every (question, choice) pair, question by question."""
        prompts, completions, owners = [], [], []
        for i, (q, choices) in enumerate(zip(self.questions, self.choices)):
            for choice in choices:
                prompts.append(QUESTION_TEMPLATE.format(question=q))
                completions.append(CHOICE_TEMPLATE.format(choice=choice))
                owners.append(i)
        return CompletionDataset(prompts, completions, self.source, owners)


# ----------------------------------------------------------------------------- reading


def text_field(record: dict, column: str, where: str) -> str:
    value = record[column]
    if not isinstance(value, str):
        raise UserError(f"{where}: column {column!r} holds {value!r}, not text")
    return value


def checked_records(path: Path, kinds: tuple[str, ...]) -> list[tuple[str, dict]]:
    records = read_records(path, kinds)
    if not records:
        raise UserError(f"{path} has no examples")
    for where, record in records:
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object, found {type(record).__name__}")
    return records


def read_completion_file(path: str | Path) -> CompletionDataset:
    """A causal-LM file (.jsonl, .json, .csv, .tsv): a `text` column, or `prompt` and `completion`."""
    path = Path(path)
    prompts, completions = [], []
    for where, record in checked_records(path, CAUSAL_LM_FILES):
        given = [k for k in ("text", "prompt", "completion") if record.get(k) not in (None, "")]  # a CSV's empty cell
        if "text" in given and len(given) > 1:  # which is the example? neither is dropped silently
            raise UserError(f"{where}: the row gives 'text' and {given[1]!r}: give either 'text', or 'prompt' and "
                            f"'completion'")
        if "prompt" in record and "completion" in record and "text" not in given:
            prompt, completion = text_field(record, "prompt", where), text_field(record, "completion", where)
        elif "text" in record and not {"prompt", "completion"} & set(given):
            prompt, completion = "", text_field(record, "text", where)
        else:  # a prompt without its completion, or the reverse, is neither form: its columns are named
            raise UserError(f"{where}: a causal-LM example needs a 'text' column, or 'prompt' and 'completion' "
                            f"columns (it has {', '.join(map(repr, record)) or 'none'})")
        if not completion.strip():
            raise UserError(f"{where}: the {'completion' if prompt else 'text'} is empty: there is nothing to learn")
        prompts.append(normal_text(prompt))
        completions.append(normal_text(completion))
    return CompletionDataset(prompts, completions, str(path))


def answer_index(answer, choices: list[str], where: str) -> int:
    """The index of `answer` in `choices`: the choice's text, or an index as given (a whole number, or its
    digits as text when no choice is that text)."""
    if isinstance(answer, str) and answer in choices:
        return choices.index(answer)
    if isinstance(answer, str) and answer.strip().isascii() and answer.strip().isdigit():
        answer = int(answer)  # an index given as text ("3", as HellaSwag's files give it)
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return answer
    raise UserError(f"{where}: the answer {answer!r} is not among the {len(choices)} choices (give the choice's "
                    f"text, or its index 0 to {len(choices) - 1})")


def read_choice_file(path: str | Path) -> ChoiceDataset:
    """A multiple-choice file (.jsonl, .json): `question` (text), `choices` (a list of 2 or more texts) and
    `answer` (the right choice's index from 0, as a number or as digits, or its text)."""
    path = Path(path)
    questions, choices, answers = [], [], []
    for where, record in checked_records(path, CHOICE_FILES):
        for column in ("question", "choices", "answer"):
            if column not in record:
                raise UserError(f"{where}: there is no column {column!r} (a multiple-choice example has "
                                f"'question', 'choices' and 'answer')")
        options = record["choices"]
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(c, str) and c.strip()
                                                                        for c in options):
            raise UserError(f"{where}: 'choices' must be a list of 2 or more non-empty texts, got {options!r}")
        questions.append(text_field(record, "question", where))
        choices.append(options)
        answers.append(answer_index(record["answer"], options, where))
    return ChoiceDataset(questions, choices, answers, str(path))


# ----------------------------------------------------------------------------- tokens and batches


def fit_to_length(prompt: list[int], completion: list[int], max_length: int,
                  head: int = 0) -> tuple[list[int], list[int]]:
    """Cut a sequence to `max_length` tokens: the prompt loses its start first (the completion needs the
    context just before it), the completion its end only when it alone is too long. The prompt's first
    `head` tokens (the tokenizer's leading special tokens, e.g. Llama's <s>) are kept: the cut is after
    them, so a model that was pretrained with a BOS token still sees it first."""
    if len(prompt) + len(completion) <= max_length:
        return prompt, completion
    head = min(head, len(prompt), max_length - 1)  # at least one completion token stays
    start, body = prompt[:head], prompt[head:]
    keep = min(len(completion), max(max_length - head - 1 if body else max_length - head, 1))
    room = max(max_length - head - keep, 0)
    return start + (body[len(body) - room:] if room else []), completion[:keep]


def leading_special_count(ids: list[int], special: set[int]) -> int:
    """How many of `ids`' first tokens are special tokens (what the tokenizer put before the text)."""
    n = 0
    while n < len(ids) and ids[n] in special:
        n += 1
    return n


def split_encodings(data: CompletionDataset, tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) per example.

    The prompt and the completion are encoded together, `prompt + completion` with the tokenizer's
    special tokens, and the completion's ids are the joint ids after the prompt's own: a tokenizer
    encodes a completion differently alone than after its prompt (SentencePiece "legacy" tokenizers,
    Llama-2's and Mistral v0.1's, turn `" red"` alone into ['▁', '▁red'], a token that `"Answer: red"`
    never has). Training and scoring both read these sequences, so they see the same tokens. Where the
    prompt's ids are not a prefix of the joint ids (the last prompt token merges with the completion's
    first, e.g. a prompt ending in a space, or the tokenizer closes every text with a special token)
    there is no token boundary between them: the prompt and the completion are then encoded apart, the
    completion without special tokens. A prompt's trailing whitespace is first moved to the completion's
    start (as lm-evaluation-harness does), so `"Answer: "` + `"red"` reads as `"Answer:"` + `" red"`, the
    tokens a pretrained BPE or SentencePiece model knows, and not a lone space token before `"red"`.
    """
    texts = [(p.rstrip(), p[len(p.rstrip()):] + c) for p, c in zip(data.prompts, data.completions)]
    prompts = tokenizer([p for p, _ in texts], add_special_tokens=True)["input_ids"]
    joint = tokenizer([p + c for p, c in texts], add_special_tokens=True)["input_ids"]
    apart = [i for i, (p, j) in enumerate(zip(prompts, joint)) if list(j[:len(p)]) != list(p)]
    alone = tokenizer([texts[i][1] for i in apart], add_special_tokens=False)["input_ids"] if apart else []
    completions = [list(j[len(p):]) for p, j in zip(prompts, joint)]
    for i, ids in zip(apart, alone):
        completions[i] = list(ids)
    return [(list(p), c) for p, c in zip(prompts, completions)]


def encode_completions(data: CompletionDataset, tokenizer, max_length: int, eos: bool) -> list[dict]:
    """input_ids and labels (the completion's ids, -100 over the prompt) per example, unpadded.

    The prompt carries the tokenizer's special tokens (e.g. Llama's <s>), the completion's ids are
    those that follow the prompt's in the joint encoding (see `split_encodings`), and with `eos` the EOS
    token closes the completion (so a tuned model learns to stop). A prompt that encodes to no token (a
    `text` row, with a tokenizer that adds no BOS: GPT-2, Qwen2) gets the BOS token (else the EOS token)
    as its context, so that the completion's first token is predicted and learned too. A sequence longer
    than `max_length` loses the start of its prompt after the leading special tokens; where the
    completion alone is too long it loses its end (and its EOS), and a warning says how many did.
    """
    if len(data) == 0:
        return []
    closing = [tokenizer.eos_token_id] if eos and tokenizer.eos_token_id is not None else []
    context = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    special = set(tokenizer.all_special_ids)
    encoded, cut, longest = [], 0, 0
    for prompt, completion in split_encodings(data, tokenizer):
        if not prompt and context is not None:
            prompt = [context]
        head = leading_special_count(prompt, special)
        whole = completion + closing
        needed = head + min(len(prompt) - head, 1) + len(whole)  # the completion whole after one token of context
        prompt, completion = fit_to_length(prompt, whole, max_length, head)
        if len(completion) < len(whole):
            cut, longest = cut + 1, max(longest, needed)
        encoded.append({"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion})
    # the loss predicts each token from those before it: a sequence needs a scored token after its first
    unscored = sum(all(t == IGNORE_INDEX for t in e["labels"][1:]) for e in encoded)
    if unscored:
        fix = ("give --max-length 2 or more" if max_length < 2 else
               "give each a prompt, or a text of two tokens or more")
        raise UserError(f"{unscored} of {len(data)} sequences of {data.source} hold no token to predict at "
                        f"--max-length {max_length} (a causal LM predicts each token from the ones before it, so a "
                        f"sequence needs one of context and one to predict): {fix}")
    if cut:
        print(f"bayes-adalora: warning: {cut} of {len(data)} sequences of {data.source} have a "
              f"{'completion' if any(data.prompts) else 'text'} longer than --max-length {max_length} tokens and "
              f"lose its end (and the EOS token) in training and scoring; --max-length {longest} would keep them "
              f"whole", file=sys.stderr)
    return encoded


class PadCompletions:
    """Pads a batch on the right to its longest sequence: pad ids, attention mask 0, labels -100.

    A class rather than a closure so that DataLoader workers can pickle it.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def completion_loader(encoded: Iterable[dict], tokenizer, batch_size: int, shuffle: bool, seed: int,
                      min_last: int = 1):
    """`data.make_loader` over encoded completions, padded by `PadCompletions`."""
    return make_loader(encoded, tokenizer, batch_size, shuffle, seed, min_last,
                       collate_fn=PadCompletions(tokenizer.pad_token_id))
