"""A tiny randomly initialised decoder LM (Llama, Qwen2 or GPT-2) with a word-level tokenizer, and the
synthetic data of this folder: everything the offline examples of README.md need, built in seconds.

    python examples/tiny_lm.py runs/tiny-llama                       # the model (Llama)
    python examples/tiny_lm.py runs/tiny-qwen2 --model-type qwen2
    python examples/tiny_lm.py runs/tiny-llama --write-data examples  # also rewrite the JSONL files

The data teaches one fact per word: each of the words w0..w23 has a colour (red, green or blue), asked
as "what is the color of w7 ?" with the answer after "Answer:". A model that learns the mapping gets
the multiple-choice questions right (chance: 1/3) and its completion NLL falls towards 0.
The tokenizer has no pad token (on purpose: padding then falls back to the EOS token).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = [f"w{i}" for i in range(24)]
COLORS = ("red", "green", "blue")
SPECIAL = ("<unk>", "<s>", "</s>")
VOCAB = [*SPECIAL, "what", "is", "the", "color", "of", "?", "Answer", ":", ".", "a", "word", *COLORS, *WORDS]


def color_of(word: str) -> str:
    return COLORS[int(word[1:]) * 7 % 3]


def question(word: str) -> str:
    return f"what is the color of {word} ?"


def build_tokenizer():
    """A word-level tokenizer over VOCAB that starts every text with <s> (as Llama's does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_model(model_type: str, vocab_size: int, seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    ids = dict(bos_token_id=1, eos_token_id=2, vocab_size=vocab_size)
    if model_type == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **ids))
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, max_position_embeddings=128, **ids)
    if model_type == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**shape))
    if model_type == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape))
    raise ValueError(f"model type {model_type!r}: choose llama, qwen2 or gpt2")


def save_tiny_lm(path: str | Path, model_type: str = "llama", seed: int = 0) -> Path:
    """Save a tiny random `model_type` causal LM and its tokenizer to `path` (a folder)."""
    path = Path(path)
    tokenizer = build_tokenizer()
    build_model(model_type, len(VOCAB), seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def data_rows(kind: str, words: list[str]) -> list[dict]:
    """causal-lm (prompt/completion), text, or multiple-choice rows, one per word given."""
    if kind == "causal-lm":
        return [{"prompt": f"{question(w)}\nAnswer:", "completion": f" {color_of(w)}"} for w in words]
    if kind == "text":
        return [{"text": f"the color of {w} is {color_of(w)} ."} for w in words]
    rows = []
    for i, w in enumerate(words):
        answer = color_of(w)  # the answer as an index or as the choice's text: both are accepted
        rows.append({"question": question(w), "choices": list(COLORS), "answer": answer if i % 2 else
                     COLORS.index(answer)})
    return rows


def write_data(folder: str | Path, train_repeats: int = 8) -> list[Path]:
    """{causal-lm,text,multiple-choice}-{train,dev}.jsonl: every word `train_repeats` times to train on,
    once for dev."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    train_words = WORDS * train_repeats
    rng.shuffle(train_words)
    written = []
    for kind in ("causal-lm", "text", "multiple-choice"):
        for split, words in (("train", train_words), ("dev", WORDS)):
            path = folder / f"{kind}-{split}.jsonl"
            path.write_text("".join(json.dumps(row) + "\n" for row in data_rows(kind, words)))
            written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="folder for the model and its tokenizer")
    parser.add_argument("--model-type", default="llama", choices=("llama", "qwen2", "gpt2"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-data", metavar="FOLDER", help="also write the synthetic JSONL files there")
    args = parser.parse_args()
    print(save_tiny_lm(args.output, args.model_type, args.seed))
    if args.write_data:
        for path in write_data(args.write_data):
            print(path)


if __name__ == "__main__":
    main()
