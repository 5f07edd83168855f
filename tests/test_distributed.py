"""Two CPU processes (gloo) through torchrun and the Trainer: same masks on both, close to one process."""

import json
import math
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from bayes_adalora.cli import main
from conftest import save_tiny_deberta
from helpers import train_argv


@pytest.fixture(scope="module")
def tiny_deberta_no_dropout(tmp_path_factory):
    """Dropout draws from each process's RNG on its shard; without it, 2 x 16 examples = 1 x 32."""
    return save_tiny_deberta(tmp_path_factory.mktemp("tiny-deberta-nodrop"), hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0, pooler_dropout=0.0)


def args(glue_dir, model, out, method):
    # 32 examples: two global batches of 16 an epoch, which 2 processes share as 8 and 8 rows
    return train_argv(glue_dir, model, out, method=method, max_steps=16, batch_size=16, max_length=32, eval_steps=8,
                      max_train_samples=32)


@pytest.mark.parametrize("method", ["bayes-adalora", "adalora"])
def test_two_processes_mask_alike_and_match_one_process(method, tmp_path, glue_dir, tiny_deberta_no_dropout):
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
    assert two["final_ranks"] == one["final_ranks"]
    a, b = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (single, double))
    assert a.keys() == b.keys()
    # same global batches and the same IVON noise: only the order of float sums differs
    worst = max((a[k] - b[k]).abs().max().item() / (a[k].abs().max().item() + 1e-12) for k in a if a[k].numel())
    assert worst < 1e-3, worst


def test_an_epochs_short_last_batch_is_completed_as_accelerate_does_not_a_nan(tmp_path, glue_dir,
                                                                             tiny_deberta_no_dropout):
    # 33 examples in batches of 16: the epoch's last batch holds 1 example, which 2 processes cannot share;
    # accelerate completes it with examples from the epoch's start (its even_batches), so neither process is
    # left without rows (a NaN loss) and an epoch is 3 steps, as in one process
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cli = args(glue_dir, tiny_deberta_no_dropout, out, "adalora")
    cli[cli.index("--max-steps") + 1] = "5"
    cli[cli.index("--max-train-samples") + 1] = "33"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "bayes_adalora.cli", *cli, "--eval-steps", "5"]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    history = json.loads((out / "history.json").read_text())
    # 5 steps of 3 batches an epoch: evaluations at the first epoch's end and at the last step
    assert len(history["loss"]) == 5 and all(math.isfinite(x) for x in history["loss"])
    assert [e["step"] for e in history["eval"]] == [3, 5]
    assert result["processes"] == 2


def test_the_command_closes_the_process_group_it_opened_and_leaves_the_callers(tmp_path, monkeypatch):
    """Left open at exit, a gloo process can abort ("terminate called without an active exception") after its
    run was written, failing torchrun; the command closes the group it opened however it ends (here: a refused
    folder), and leaves open one its caller opened."""
    import torch.distributed as dist

    from bayes_adalora import cli

    store = f"file://{tmp_path / 'store'}"
    quiet = cli.quiet_libraries
    monkeypatch.setattr(cli, "quiet_libraries",  # as the Trainer's arguments open it, during the command
                        lambda: (quiet(), dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)))
    try:
        assert main(["plot", str(tmp_path / "absent")]) == 2
        assert not dist.is_initialized()
        monkeypatch.setattr(cli, "quiet_libraries", quiet)
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0, world_size=1)
        assert main(["plot", str(tmp_path / "absent")]) == 2
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
