"""Memory per process of bayes-adalora under FSDP2, on the CPU: 1 process (whole model) against 2 and 4
processes (`fully_shard`, gloo), a decoder large enough for the weights to dominate (a randomly initialised
Llama of about 120M parameters; no download).

The first process builds the whole model (as loading a checkpoint does) and adds the AdaLoRA adapter; under
FSDP (2 and 4 processes) the others build it empty on the meta device, and each receives its rows from the first
(`sharding.shard_from_first_process`, what `--fsdp` runs), then trains a few bayes-adalora steps with IVON on its
shards. Reported per process: `weights_mb`, the memory of the parameters it holds (its rows under FSDP) and IVON's
state; the resident memory (RSS) before any model (`rss_start_mb`: the libraries), once the model is built
(`rss_load_mb`: the whole model in the first process, an empty one in the others), the highest from the build
through sharding (`rss_load_peak_mb`, sampled every 5 ms), once sharded (`rss_sharded_mb`), and the highest
while training (`rss_train_mb`: with the blocks FSDP gathers one at a time and the activations).

    python benchmarks/fsdp_memory.py            # runs 1, 2 and 4 processes, writes results/fsdp-memory.json
    python benchmarks/fsdp_memory.py --report   # prints the table of the JSON file
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "fsdp-memory.json"
PROCESSES = (1, 2, 4)
STEPS = 3


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


class PeakSampler:
    """The highest resident memory of this process while it runs, sampled every 5 ms by a thread."""

    def __init__(self):
        self.peak, self.running = rss_mb(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.005)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return max(self.peak, rss_mb())


def worker(out: Path) -> None:
    import gc

    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from bayes_adalora.allocator import install_allocator
    from bayes_adalora.build import build_trainable_model, make_optimizer
    from bayes_adalora.config import TrainConfig
    from bayes_adalora.sharding import local_shard, shard_from_first_process
    from bayes_adalora.steps import IVONStep, NoiseStream

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.set_num_threads(1)
    torch.manual_seed(0)
    start = rss_mb()  # the libraries, before any model
    loading = PeakSampler()
    with torch.device("meta" if rank > 0 else "cpu"):  # under FSDP the first process alone holds the weights
        base = LlamaForCausalLM(LlamaConfig(vocab_size=8000, hidden_size=1024, intermediate_size=2816,
                                            num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16))
    config = TrainConfig(task="causal-lm", train_file="unused", validation_file="unused", init_r=8, target_r=4,
                         tinit=1, tfinal=1, delta_t=1)
    model = build_trainable_model(base, config, STEPS, set())
    del base
    gc.collect()
    load = rss_mb()
    if world > 1:
        shard_from_first_process(model, torch.device("cpu"))
    gc.collect()
    load_peak = loading.stop()
    sharded = rss_mb()
    optimizer = make_optimizer(model, config, ess=1e5, total_steps=STEPS)
    install_allocator(model, "bayes-adalora", optimizer, "snr_abs")
    step = IVONStep(optimizer, 1, NoiseStream(0))
    weights = sum(local_shard(p).numel() * local_shard(p).element_size() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for g in optimizer.param_groups for t in (g["hess"], g["momentum"]))
    tokens = torch.randint(0, 8000, (2, 64), generator=torch.Generator().manual_seed(rank))
    sampler = PeakSampler()
    started = time.perf_counter()
    for it in range(1, STEPS + 1):
        def forward_backward():
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            return loss

        step.gradients(forward_backward)
        step.update()
        model.base_model.update_and_allocate(it)
    seconds = (time.perf_counter() - started) / STEPS
    peak = sampler.stop()
    row = {"rank": rank, "weights_mb": (weights + state) / 2**20, "rss_start_mb": start, "rss_load_mb": load,
           "rss_load_peak_mb": load_peak, "rss_sharded_mb": sharded, "rss_train_mb": peak, "seconds_per_step": seconds}
    rows = [None] * world
    if world > 1:
        dist.all_gather_object(rows, row)
        del model, optimizer, step  # what holds the process group goes first (a gloo process can abort at exit)
        gc.collect()
        dist.destroy_process_group()
    else:
        rows = [row]
    if rank == 0:
        out.write_text(json.dumps(rows))


def run(processes: int) -> list[dict]:
    out = RESULTS.parent / f".fsdp-memory-{processes}.json"
    launch = [sys.executable, __file__] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), __file__]
    # glibc's malloc raises its mmap threshold after large frees, so the whole model's memory freed by sharding
    # would stay resident in its heap: a fixed threshold returns it, so the RSS shows what the process holds
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    subprocess.run([*launch, "--worker", str(out)], check=True, env=env)
    rows = json.loads(out.read_text())
    out.unlink()
    return rows


def report(results: dict) -> str:
    lines = ["| processes | weights + IVON state (MB) | RSS: libraries | load peak: first process | load peak: others "
             "| sharded | training peak | s/step |", "|---|---|---|---|---|---|---|---|"]
    for processes, rows in results["runs"].items():
        most = {key: max(r[key] for r in rows) for key in rows[0] if key != "rank"}  # the largest process
        first = rows[0]["rss_load_peak_mb"]
        others = f"{max(r['rss_load_peak_mb'] for r in rows[1:]):.0f}" if len(rows) > 1 else "-"
        lines.append(f"| {processes} | {most['weights_mb']:.0f} | {most['rss_start_mb']:.0f} | {first:.0f} | "
                     f"{others} | {most['rss_sharded_mb']:.0f} | {most['rss_train_mb']:.0f} | "
                     f"{most['seconds_per_step']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--report", action="store_true", help="print the table of the results file")
    args = parser.parse_args()
    if args.worker:
        return worker(Path(args.worker))
    if args.report:
        print(report(json.loads(RESULTS.read_text())))
        return None
    import torch

    results = {"model": "Llama, 8 layers, hidden 1024, vocab 8000 (about 120M parameters), fp32",
               "adapter": "AdaLoRA init_r 8 on the default target modules, IVON",
               "torch": torch.__version__, "cpu_cores": os.cpu_count(), "steps": STEPS, "runs": {}}
    for processes in PROCESSES:
        results["runs"][str(processes)] = run(processes)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    return None


if __name__ == "__main__":
    main()
