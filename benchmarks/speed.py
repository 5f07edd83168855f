"""Training-step speed of stock peft AdaLoRA + AdamW, our adalora, adalora-ivon, bayes-adalora, and lora.

`peft-adalora` is what a user picks instead: peft's AdaLoRA with AdamW, stock (`fast_path=False`:
peft's layers and penalty). `adalora`, `adalora-ivon` and `bayes-adalora` run our fast path
(`TrainConfig.fast_path`, wired by the package's `build.py`: fused layer, batched penalty, cached final
masks, in-place IVON). Every method steps through the package's step interface (`steps.py`).
All methods live in one process and take turns step by step on the same batches, so machine
drift cancels. Each step is split into: forward+backward, optimizer (AdamW step; IVON's
sampling, restore and update), and rank allocation (peft's `update_and_allocate`, which for
`adalora` also updates the sensitivity EMAs at every step). Medians over steps; allocation is
also given as its mean share of the step, since it only does real work at masking steps.

    python benchmarks/speed.py --setting cpu --threads 1   # packaged MiniLM, batch 32, SST-2 sentences
    python benchmarks/speed.py --setting gpu --dtype bf16   # DeBERTaV3-base-shaped, batch 32, len 128

Peak memory: on the GPU, torch's peak allocation during each method's steps. On the CPU the
methods share one process, so each one also runs `--memory-steps` steps alone in a fresh
process (Linux): its peak resident set size during those steps is reported, and how much of it
training adds to the built model (activations, gradients, optimizer state).

Ratios are to `peft-adalora` and to `lora`. Writes benchmarks/results/speed-<setting>[-<dtype>].json
and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from datetime import date
from pathlib import Path

import torch

from bayes_adalora.allocator import install_allocator
from bayes_adalora.build import build_trainable_model, make_optimizer, make_training_step
from bayes_adalora.config import TrainConfig
from bayes_adalora.methods import METHODS as REGISTRY

STOCK = "peft-adalora"  # peft's AdaLoRA + AdamW, no fast path: the baseline
# the baseline, then every adapter method of the registry (bayes-adalora, adalora-ivon, adalora, lora)
METHODS = (STOCK, *(name for name, m in REGISTRY.items() if m.adapter is not None))
HERE = Path(__file__).resolve().parent


GLUE = Path(os.environ.get("GLUE_DIR") or HERE.parents[1] / "shared" / "data" / "glue")


def cpu_batches(n_batches: int, batch_size: int, max_length: int, seed: int):
    """Real SST-2 sentences (GLUE's SST-2/train.tsv under $GLUE_DIR), a seeded random draw,
    tokenised for the packaged MiniLM and padded per batch."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    from bayes_adalora.data import encode, make_loader, read_glue_tsv
    from bayes_adalora.models import default_model_path
    from bayes_adalora.tasks import get_task

    data = read_glue_tsv(get_task("sst2"), GLUE / "SST-2" / "train.tsv")
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[: n_batches * batch_size].tolist()
    data = replace(data, texts=[data.texts[i] for i in pick], labels=[data.labels[i] for i in pick])
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    return list(make_loader(encode(data, tokenizer, max_length), tokenizer, batch_size, False, seed))


def gpu_batches(n_batches: int, batch_size: int, length: int, vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(5, vocab, (batch_size, length), generator=gen),
            "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch_size,), generator=gen),
        }
        for _ in range(n_batches)
    ]


def base_model(setting: str):
    from transformers import AutoModelForSequenceClassification, DebertaV2Config, DebertaV2ForSequenceClassification

    if setting == "cpu":
        from bayes_adalora.models import default_model_path

        return AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)
    config = DebertaV2Config(  # microsoft/deberta-v3-base's shape, random weights (no hub here)
        vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=512, relative_attention=True, position_buckets=256,
        norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"], max_relative_positions=-1,
        type_vocab_size=0, num_labels=2,
    )
    return DebertaV2ForSequenceClassification(config)


class Method:
    """One method's model, optimizer and allocator, stepping with a timer per phase."""

    def __init__(self, name: str, setting: str, total_steps: int, device, seed: int):
        torch.manual_seed(seed)
        self.name = name
        init_r, target_r = (6, 4) if setting == "cpu" else (3, 2)  # the paper's rank-2 budget on the GPU
        self.config = TrainConfig(
            method="adalora" if name == STOCK else name, init_r=init_r, target_r=target_r, lora_r=target_r,
            tinit=total_steps // 10, tfinal=total_steps // 5, delta_t=10, fast_path=name != STOCK,
        )
        self.model = build_trainable_model(base_model(setting), self.config, total_steps, set()).to(device)
        self.model.train()
        self.optimizer = make_optimizer(self.model, self.config, ess=67349.0, total_steps=total_steps)
        self.training_step = make_training_step(self.optimizer, self.config)
        allocator = install_allocator(self.model, self.config.method, self.optimizer, "snr_abs")
        self.tuner = self.model.base_model if allocator is not None else None
        self.times: dict[str, list[float]] = {"step": [], "forward_backward": [], "optimizer": [], "allocation": []}

    def step(self, batch, step: int, autocast, sync) -> None:
        """One training step, timed in phases: before `forward_backward` starts (IVON: drawing the
        sample), forward + backward, then the rest of the step (IVON: restoring mu, the update)."""
        t = [time.perf_counter()]

        def mark():
            sync()
            t.append(time.perf_counter())

        def forward_backward():
            mark()  # the sample is drawn (IVON), the gradients zeroed
            with autocast:
                loss = self.model(**batch).loss
            loss.backward()
            mark()
            return loss

        self.training_step.gradients(forward_backward)
        self.training_step.update()
        mark()  # restore + update
        if self.tuner is not None:
            self.tuner.update_and_allocate(step)
        mark()
        self.times["step"].append(t[-1] - t[0])
        self.times["forward_backward"].append(t[2] - t[1])
        self.times["optimizer"].append((t[1] - t[0]) + (t[3] - t[2]))
        self.times["allocation"].append(t[-1] - t[-2] if self.tuner is not None else 0.0)


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_alone(args) -> dict:
    """In this (fresh) process: build one method, then train it args.steps steps on the CPU; the
    peak RSS is taken over the training steps only (loading's transient peak is reset away)."""
    import gc

    batches = cpu_batches(args.steps, 32, 64, seed=0)
    method = Method(args.memory_of, "cpu", args.steps, torch.device("cpu"), seed=0)
    gc.collect()
    built = rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux 4.0+)
    for i, batch in enumerate(batches):
        method.step(batch, i + 1, nullcontext(), lambda: None)
    peak = rss_mb("VmHWM")
    return {"peak_rss_mb": peak, "training_adds_mb": peak - built}


def cpu_memory(methods, steps: int) -> dict:
    """Each method alone in a fresh process (`memory_alone`); RSS cannot be split inside one."""
    out = {}
    for name in methods:
        cmd = [sys.executable, __file__, "--setting", "cpu", "--memory-of", name, "--steps", str(steps),
               "--threads", str(torch.get_num_threads())]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def run(args) -> dict:
    device = torch.device("cuda" if args.setting == "gpu" else "cpu")
    if args.setting == "cpu":
        batches = cpu_batches(args.steps + args.warmup, 32, 64, seed=0)
    else:
        batches = gpu_batches(8, 32, 128, 128100, seed=0)
    total = args.steps + args.warmup
    methods = [Method(m, args.setting, total, device, seed=0) for m in args.methods]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    peak = {}
    load_before = os.getloadavg()
    for i in range(total):
        batch = {k: v.to(device) for k, v in batches[i % len(batches)].items()}
        for m in methods:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            m.step(batch, i + 1, autocast, sync)
            if device.type == "cuda":
                peak[m.name] = max(peak.get(m.name, 0.0), torch.cuda.max_memory_allocated() / 2**20)
        if i + 1 == args.warmup:
            for m in methods:
                for v in m.times.values():
                    v.clear()
    load_after = os.getloadavg()  # other processes on the machine during the timed steps
    rows = {}
    for m in methods:
        med = {k: statistics.median(v) for k, v in m.times.items()}
        rows[m.name] = {
            "step_s": med["step"],
            "forward_backward_s": med["forward_backward"],
            "optimizer_s": med["optimizer"],
            "allocation_mean_s": statistics.fmean(m.times["allocation"]),
            "allocation_share": statistics.fmean(m.times["allocation"]) / statistics.fmean(m.times["step"]),
            "allocation_max_s": max(m.times["allocation"]),
            "peak_memory_mb": peak.get(m.name),
        }
    del methods  # free the four models before the memory processes start
    if device.type == "cpu" and args.memory_steps:
        for name, mem in cpu_memory(args.methods, args.memory_steps).items():
            rows[name].update(peak_rss_mb=mem["peak_rss_mb"], training_adds_rss_mb=mem["training_adds_mb"])
    for r in rows.values():
        r["ratio_to_peft_adalora"] = r["step_s"] / rows[STOCK]["step_s"]
        r["ratio_to_lora"] = r["step_s"] / rows["lora"]["step_s"] if "lora" in rows else None
    return {
        "setting": args.setting, "dtype": args.dtype, "steps": args.steps, "warmup": args.warmup,
        "date": date.today().isoformat(), "machine": machine(device), "torch": torch.__version__,
        "memory_steps": args.memory_steps if device.type == "cpu" else None,
        "load_average_1min": {"before": load_before[0], "after_timing": load_after[0]}, "methods": rows,
    }


def machine(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def table(result: dict) -> str:
    lines = [
        f"Setting {result['setting']} ({result['dtype']}), {result['machine']}, {result['date']}, "
        f"median of {result['steps']} interleaved steps after {result['warmup']} warm-up; 1-min load average "
        f"{result['load_average_1min']['before']:.2f} before, {result['load_average_1min']['after_timing']:.2f} after",
        "",
        "| method | step (ms) | ratio to peft-adalora | ratio to lora | fwd+bwd (ms) | optimizer (ms) "
        "| allocation, mean (ms) | allocation share | peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["methods"].items():
        if r.get("peak_memory_mb"):
            mem = f"{r['peak_memory_mb']:.0f} (GPU)"
        elif r.get("peak_rss_mb"):
            mem = f"{r['peak_rss_mb']:.0f} RSS (+{r['training_adds_rss_mb']:.0f} training)"
        else:
            mem = "-"
        lines.append(
            f"| {name} | {1e3 * r['step_s']:.1f} | {r['ratio_to_peft_adalora']:.3f} "
            f"| {'-' if r['ratio_to_lora'] is None else format(r['ratio_to_lora'], '.3f')} "
            f"| {1e3 * r['forward_backward_s']:.1f} | {1e3 * r['optimizer_s']:.2f} "
            f"| {1e3 * r['allocation_mean_s']:.3f} | {100 * r['allocation_share']:.2f}% | {mem} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per method first")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help=f"which methods ({STOCK} is always one: the ratios are to it, and to lora)")
    parser.add_argument("--memory-steps", type=int, default=10,
                        help="CPU: steps of each method alone in a fresh process for its peak RSS (0: skip)")
    parser.add_argument("--memory-of", choices=METHODS, help=argparse.SUPPRESS)  # the fresh process's job
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if STOCK not in args.methods:
        args.methods.insert(0, STOCK)
    if args.setting == "gpu" and not torch.cuda.is_available():
        print("speed.py: --setting gpu needs a CUDA device", file=sys.stderr)
        return 2
    from bayes_adalora.cli import quiet_libraries

    quiet_libraries()
    if args.memory_of:
        print(json.dumps(memory_alone(args)))
        return 0
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"speed-{args.setting}" + ("" if args.setting == "cpu" and args.dtype == "fp32" else f"-{args.dtype}")
    if sorted(args.methods) != sorted(METHODS):
        name += "-" + "-".join(args.methods)  # a partial run never replaces the full table
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
