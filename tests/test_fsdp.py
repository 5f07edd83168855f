"""FSDP2 on the CPU: 2 gloo processes with torch's `fully_shard` against 1 process, IVON on each process's
shards and the posterior rank allocation reduced over them (tests/fsdp_run.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bayes_adalora.ivon_inplace import InplaceIVON, ShardedIVON
from bayes_adalora.sharding import gather_rows, local_shard, shard_rows

SCRIPT = Path(__file__).with_name("fsdp_run.py")


def run(kind: str, criterion: str, out: Path, processes: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, str(SCRIPT)] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), str(SCRIPT)]
    done = subprocess.run([*launch, kind, criterion, str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def relative_gap(a: dict, b: dict) -> float:
    return max(np.abs(np.array(a[k]) - np.array(b[k])).max() / (np.abs(np.array(a[k])).max() + 1e-12) for k in a)


@pytest.mark.parametrize("kind, criterion", [("llama", "snr_abs"), ("minilm", "snr_abs"), ("llama", "mean_abs")])
def test_two_sharded_processes_train_as_one_does(kind, criterion, tmp_path):
    one = run(kind, criterion, tmp_path / "one.json", 1)
    two = run(kind, criterion, tmp_path / "two.json", 2)
    assert two["sharded"] and not one["sharded"]
    # every masking step: the same rank pattern in both processes and in the single run
    assert two["patterns"][0] == two["patterns"][1] == one["patterns"][0]
    assert sum(sum(flags) for flags in one["patterns"][0][-1].values()) < sum(
        len(flags) for flags in one["patterns"][0][-1].values())  # triplets were masked
    assert one["weights"].keys() == two["weights"].keys()
    assert relative_gap(one["weights"], two["weights"]) < 1e-4
    # the posterior file's Hessians, gathered whole from the shards
    assert one["hess"].keys() == two["hess"].keys() and len(one["hess"]) == len(one["weights"])
    assert relative_gap(one["hess"], two["hess"]) < 1e-4


def test_sharded_ivon_on_whole_parameters_is_inplace_ivon_bitwise():
    """One process, no sharding: ShardedIVON's copies in and out and its whole-vector noise draw change nothing."""
    torch.manual_seed(0)
    weights = [torch.randn(5, 3), torch.randn(4)]
    results = []
    for cls in (InplaceIVON, ShardedIVON):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        optimizer = cls(params, lr=0.1, ess=100.0, hess_init=0.3, clip_radius=0.5, beta2=0.9)
        torch.manual_seed(1)
        for _ in range(3):
            with optimizer.sampled_params(train=True):
                loss = sum((p ** 2).sum() for p in params)
                loss.backward()
            optimizer.step()
        results.append([p.detach().clone() for p in params] + [optimizer.param_groups[0]["hess"].clone()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_a_whole_tensor_is_its_own_shard():
    p = torch.nn.Parameter(torch.arange(6.0).reshape(3, 2))
    assert shard_rows(p) == (0, 3)
    assert local_shard(p).data_ptr() == p.data_ptr()
    local = local_shard(p)
    assert gather_rows(p, local) is local
