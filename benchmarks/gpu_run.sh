#!/usr/bin/env bash
# One prepared GPU session: the speed table (DeBERTaV3-base shape, fp32 and bf16). It also ran Mini-GLUE v1's
# grid until v1 (benchmarks/mini_glue.py) was retired for mini_glue_v3.py; the v2 grid's GPU plan is
# benchmarks/gpu_grid_v2.sh.
# Needs .devcarry/ (listed in .git/info/exclude, carried to the device; never committed):
#   .devcarry/ivon_opt-*.whl        pip download --no-deps -d .devcarry ivon-opt==0.1.3
# Usage on the device: bash benchmarks/gpu_run.sh OUTDIR
set -uo pipefail
out=${1:?output folder}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devcarry/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/gpu.txt"
{
  python3 benchmarks/speed.py --setting gpu --dtype fp32 --steps 30 --warmup 6 --out "$out"
  python3 benchmarks/speed.py --setting gpu --dtype bf16 --steps 30 --warmup 6 --out "$out"
} 2>&1 | grep -v -i warn | tee "$out/speed.log"
