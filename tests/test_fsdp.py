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
from safetensors.torch import load_file

from bayes_adalora.cli import main
from bayes_adalora.ivon_inplace import InplaceIVON, ShardedIVON
from bayes_adalora.sharding import gather_rows, local_shard, shard_rows
from conftest import save_tiny_deberta
from helpers import complete_checkpoints, kill_at_checkpoint, read_json, refused, train_argv

SCRIPT = Path(__file__).with_name("fsdp_run.py")


@pytest.fixture(scope="module")
def tiny_deberta_no_dropout(tmp_path_factory):
    """Dropout draws from each process's RNG on its rows; without it, 2 x 8 examples = 1 x 16."""
    return save_tiny_deberta(tmp_path_factory.mktemp("tiny-deberta-nodrop"), hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0, pooler_dropout=0.0)


def cli_args(glue_dir, model, out, *extra):
    return train_argv(glue_dir, model, out, *extra, max_steps=16, batch_size=16, max_length=32, eval_steps=8,
                      max_train_samples=32)


def run(kind: str, criterion: str, out: Path, processes: int, method: str = "bayes-adalora") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, str(SCRIPT)] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), str(SCRIPT)]
    done = subprocess.run([*launch, kind, criterion, str(out), method], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def relative_gap(a: dict, b: dict) -> float:
    return max(np.abs(np.array(a[k]) - np.array(b[k])).max() / (np.abs(np.array(a[k])).max() + 1e-12) for k in a)


@pytest.mark.parametrize("kind, criterion, method", [
    ("llama", "snr_abs", "bayes-adalora"), ("minilm", "snr_abs", "bayes-adalora"),
    ("llama", "mean_abs", "bayes-adalora"),
    ("llama", "snr_abs", "adalora-ivon"), ("minilm", "snr_abs", "adalora"), ("llama", "snr_abs", "adalora"),
])
def test_two_sharded_processes_train_as_one_does(kind, criterion, method, tmp_path):
    one = run(kind, criterion, tmp_path / "one.json", 1, method)
    two = run(kind, criterion, tmp_path / "two.json", 2, method)
    assert two["sharded"] and not one["sharded"]
    # every masking step: the same rank pattern in both processes and in the single run
    assert two["patterns"][0] == two["patterns"][1] == one["patterns"][0]
    assert sum(sum(flags) for flags in one["patterns"][0][-1].values()) < sum(
        len(flags) for flags in one["patterns"][0][-1].values())  # triplets were masked
    assert one["weights"].keys() == two["weights"].keys()
    assert relative_gap(one["weights"], two["weights"]) < 1e-4
    if method == "adalora":  # AdamW: no posterior
        return
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


@pytest.mark.parametrize("method, strategy", [("bayes-adalora", "full_shard"), ("bayes-adalora", "shard_grad_op"),
                                              ("lora", "full_shard"), ("adalora", "full_shard"),
                                              ("adalora-ivon", "shard_grad_op"), ("full", "full_shard")])
def test_the_command_trains_sharded_over_two_processes_as_one_process_does(method, strategy, tmp_path, glue_dir,
                                                                          tiny_deberta_no_dropout):
    """shard_grad_op keeps the blocks gathered after an evaluation's forward: the run shards them again."""
    single, double = tmp_path / "single", tmp_path / "double"
    mc = ["--mc-samples", "2"] if method == "bayes-adalora" else []  # the posterior predictive draws on shards
    assert main(cli_args(glue_dir, tiny_deberta_no_dropout, single, "--method", method, *mc)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
              "bayes_adalora.cli", *cli_args(glue_dir, tiny_deberta_no_dropout, double, "--method", method,
                                             "--fsdp", strategy, *mc)]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (read_json(r / "results.json") for r in (single, double))
    assert (one["processes"], two["processes"], read_json(double / "config.json")["fsdp"]) == (1, 2, strategy)
    assert one["final_ranks"] == two["final_ranks"]  # the run itself checks that both processes agree
    assert two["metrics"]["final"]["accuracy"] == one["metrics"]["final"]["accuracy"]
    if mc:  # the same draws as one process: each process adds its rows of one whole draw
        assert two["metrics"]["mc"]["nll"] == pytest.approx(one["metrics"]["mc"]["nll"], rel=1e-4)
    # the files hold the whole tensors, gathered from the shards
    files = ["model/model.safetensors" if method == "full" else "adapter/adapter_model.safetensors"] + (
        ["posterior.safetensors"] if method in ("bayes-adalora", "adalora-ivon") else [])
    for name in files:
        a, b = load_file(single / name), load_file(double / name)
        assert a.keys() == b.keys()
        # a key's bias has a gradient of 0 up to rounding (softmax ignores a shift of a query's scores), and AdamW's
        # g / sqrt(v) steps on that rounding, which one process and two do not share: full's key biases are left out
        kept = [k for k in a if a[k].numel() and not k.endswith("key_proj.bias")]
        assert relative_gap(*({k: t[k].tolist() for k in kept} for t in (a, b))) < 1e-4
    if method == "bayes-adalora":  # sigma's spread at the masking steps: over the whole posterior, not one shard
        sigma = [read_json(r / "history.json")["sigma"] for r in (single, double)]
        assert [s["step"] for s in sigma[0]] == [s["step"] for s in sigma[1]]
        assert all(abs(x[k] - y[k]) <= 1e-4 * abs(x[k]) for x, y in zip(*sigma) for k in x if k.startswith("sigma/"))
        # the exported, merged model of a sharded run, as of any run
        assert main(["export", str(double), "--merge"]) == 0
        assert (double / "merged" / "config.json").is_file()


def test_sharding_in_one_process_is_refused(capfd, tmp_path, glue_dir, tiny_deberta):
    out = tmp_path / "run"
    refused(capfd, cli_args(glue_dir, tiny_deberta, out, "--fsdp", "full_shard"),
            "--fsdp shards the model over processes")
    assert not out.exists()


@pytest.mark.parametrize("extra, words", [
    (["--no-fast-path"], "drop --no-fast-path"),
])
def test_what_does_not_train_on_shards_yet_is_refused_in_one_sentence(extra, words, capfd, tmp_path, glue_dir,
                                                                       tiny_deberta):
    out = tmp_path / "run"
    refused(capfd, cli_args(glue_dir, tiny_deberta, out, "--fsdp", "full_shard", *extra), words)
    assert not out.exists()


@pytest.mark.parametrize("variable, words", [("ACCELERATE_USE_DEEPSPEED", "launched with DeepSpeed"),
                                             ("ACCELERATE_USE_FSDP", "accelerate's FSDP configuration")])
def test_a_launch_by_another_sharding_engine_is_refused_before_the_model_loads(variable, words, capfd, tmp_path,
                                                                                 glue_dir, monkeypatch):
    monkeypatch.setenv(variable, "true")
    out = tmp_path / "run"
    # a model path that does not exist: the refusal comes before any model is read
    refused(capfd, cli_args(glue_dir, tmp_path / "no-model", out), words, "--fsdp full_shard")
    assert not out.exists()


def sharded_launch(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "bayes_adalora.cli", *args]


@pytest.mark.parametrize("method", ["bayes-adalora", "adalora-ivon", "adalora", "lora", "full"])
def test_a_sharded_run_killed_and_resumed_ends_as_the_uninterrupted_sharded_run(method, tmp_path, glue_dir,
                                                                                tiny_deberta_no_dropout):
    """Checkpoints of a sharded run hold the whole tensors, as one process's run writes them; each process reads
    its rows back. Killed with SIGKILL mid-run (the launcher and both processes) and resumed, the run ends
    bitwise as the uninterrupted sharded run: metrics, loss curve, ranks, trained files."""
    def args(out, *extra):
        return train_argv(glue_dir, tiny_deberta_no_dropout, out, "--method", method, "--fsdp", "full_shard", *extra,
                          max_steps=40, batch_size=16, max_length=32, eval_steps=20, max_train_samples=32)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = subprocess.run(sharded_launch(*args(reference)), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    saving = args(killed, "--save-steps", "2")
    kill_at_checkpoint(sharded_launch(*saving), killed, 6)
    latest = max(complete_checkpoints(killed))
    checkpoint = killed / "checkpoints" / f"checkpoint-{latest}"
    settings = read_json(checkpoint / "bayes-adalora-state.json")["settings"]
    # killed while the ranks are still chosen: the resume reads the sensitivity averages back (peft drops them
    # when the masking ends)
    assert 6 <= latest < (settings["total_steps"] - settings["tfinal"] if "adalora" in method else 40)
    if method == "bayes-adalora":  # IVON's state is whole in the file: one Hessian entry per trained weight
        state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        trained = load_file(checkpoint / "adapter_model.safetensors")
        assert sum(g["hess"].numel() for g in state["param_groups"]) == sum(t.numel() for t in trained.values())
    done = subprocess.run(sharded_launch(*saving, "--resume-from-checkpoint"), env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (read_json(r / "results.json") for r in (reference, killed))
    assert one["metrics"] == two["metrics"] and one["final_ranks"] == two["final_ranks"]
    assert read_json(reference / "history.json")["loss"] == read_json(killed / "history.json")["loss"]
    files = ["model/model.safetensors" if method == "full" else "adapter/adapter_model.safetensors"] + (
        ["posterior.safetensors"] if method in ("bayes-adalora", "adalora-ivon") else [])
    for name in files:
        a, b = load_file(reference / name), load_file(killed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("method, trainer, strategy", [
    ("bayes-adalora", "IVONTrainer", "full_shard"), ("adalora", "AdaLoraTrainer", "full_shard"),
    ("adalora-ivon", "IVONTrainer", "shard_grad_op"), ("lora", "ShardedTrainer", "full_shard"),
])
def test_make_trainer_shards_over_two_processes_as_ddp_trains(method, trainer, strategy, tmp_path, glue_dir,
                                                              tiny_deberta_no_dropout):
    """The Trainer path: `make_trainer` with `config.fsdp` under torchrun against the same Trainer with DDP (2
    processes each: the stock Trainer weighs a classifier's loss by the process count, which DDP and FSDP share)."""
    script = Path(__file__).with_name("fsdp_trainer_run.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(script.parent), os.environ.get("PYTHONPATH", "")])}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
              str(tiny_deberta_no_dropout), str(glue_dir)]
    runs = {}
    for name, fsdp in (("ddp", "none"), ("fsdp", strategy)):
        (tmp_path / name).mkdir()
        done = subprocess.run([*launch, str(tmp_path / name), "8", method, fsdp], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = read_json(tmp_path / name / "result.json")
    ddp, sharded = runs["ddp"], runs["fsdp"]
    assert (ddp["sharded"], sharded["sharded"], sharded["trainer"]) == (False, True, trainer)
    assert sharded["ranks"][0] == sharded["ranks"][1] == ddp["ranks"][0]
    assert relative_gap(ddp["weights"], sharded["weights"]) < 1e-4


def test_accelerates_fsdp_in_the_trainer_arguments_is_refused_for_make_trainers_own(tmp_path, tiny_deberta,
                                                                                      monkeypatch):
    from transformers import TrainingArguments

    from bayes_adalora.config import TrainConfig
    from bayes_adalora.hf_trainer import make_trainer

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # what TrainingArguments(fsdp=...) sets: undone after
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, fsdp=True, report_to=[], max_steps=2)
    with pytest.raises(ValueError, match="leave it off and give make_trainer a config with fsdp='full_shard'"):
        make_trainer(str(tiny_deberta), [], None, TrainConfig(method="bayes-adalora"), args)
    plain = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=2)
    with pytest.raises(ValueError, match=r"TrainConfig\(fsdp=...\) shards the model over processes: launch 2"):
        make_trainer(str(tiny_deberta), [], None, TrainConfig(method="bayes-adalora", fsdp="full_shard"), plain)
