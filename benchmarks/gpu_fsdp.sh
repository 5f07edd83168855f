#!/usr/bin/env bash
# FSDP2 on NVIDIA GPUs (NCCL), one prepared session of under 10 minutes: the packaged MiniLM on SST-2 (the real
# files under $GLUE_DIR), bayes-adalora, 120 steps, batch 16 per GPU, trained three ways with the same settings: one
# process, DDP over all GPUs, and --fsdp full_shard over all GPUs. It checks that the three end with the same
# rank pattern and adapter weights within 1e-4 (relative), the same for the posterior file, and reports each
# run's seconds per step and peak GPU memory (results.json's `seconds_per_step`, `peak_memory_mb`).
# Needs 2 GPUs or more (NCCL runs one process per GPU); needs .devcarry/ivon_opt-*.whl as benchmarks/gpu_run.sh.
# Usage on the device: bash benchmarks/gpu_fsdp.sh OUTDIR
set -uo pipefail
out=${1:?output folder}
mkdir -p "$out"
gpus=$(nvidia-smi --list-gpus | wc -l)
if [ "$gpus" -lt 2 ]; then
  echo "this machine has $gpus GPU: FSDP over NCCL needs 2 or more (one process each); nothing was run" | tee "$out/fsdp.log"
  exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devcarry/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
common=(train --task sst2 --data-dir "${GLUE_DIR:?set GLUE_DIR to the GLUE files}" --method bayes-adalora
        --max-steps 120 --batch-size $((16 * gpus)) --max-length 64 --eval-steps 120 --max-eval-samples 512
        --no-plots --no-progress --seed 0)
{
  python3 -m bayes_adalora.cli "${common[@]}" --output-dir "$out/one"
  torchrun --standalone --nproc_per_node "$gpus" -m bayes_adalora.cli "${common[@]}" --output-dir "$out/ddp"
  torchrun --standalone --nproc_per_node "$gpus" -m bayes_adalora.cli "${common[@]}" --fsdp full_shard \
    --output-dir "$out/fsdp"
  python3 - "$out" <<'EOF'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
out = Path(sys.argv[1])
runs = {name: json.loads((out / name / "results.json").read_text()) for name in ("one", "ddp", "fsdp")}
for name, r in runs.items():
    print(f"{name}: {r['processes']} process(es), {r['seconds_per_step']:.3f} s/step, peak {r['peak_memory_mb']:.0f} MB "
          f"per process, accuracy {r['metrics']['final']['accuracy']:.4f}, total rank {r['total_rank']}")
for file in ("adapter/adapter_model.safetensors", "posterior.safetensors"):
    a, b = load_file(out / "one" / file), load_file(out / "fsdp" / file)
    gap = max((a[k] - b[k]).abs().max().item() / (a[k].abs().max().item() + 1e-12) for k in a if a[k].numel())
    print(f"{file}: fsdp against one process, largest relative gap {gap:.2e}")
print("same rank pattern:", runs["one"]["final_ranks"] == runs["ddp"]["final_ranks"] == runs["fsdp"]["final_ranks"])
EOF
} 2>&1 | grep -v -i warn | tee "$out/fsdp.log"
