#!/usr/bin/env bash
# Issue 9, item 4: Mini-GLUE v2's GPU plan (mini_glue_v2.py --plan gpu: 5 seeds on every task, runs of several
# epochs) on a lent device, as many cells as one call's time allows; it resumes from the committed cells.
#   Here, once:      bash benchmarks/gpu_prepare.sh            (builds .devcarry/; needs a clean commit)
#   Device tool:     run(command="bash benchmarks/gpu_grid_v2.sh", carry=[".devcarry"], timeout_s=600)
#   Back here:       tar -xzf FILES_AT/mini-glue-v2-gpu.tar.gz -C benchmarks/results
#                    python benchmarks/mini_glue_v2.py --plan gpu --report --glue-dir ../shared/data/glue
#                    git add benchmarks/results/mini-glue-v2-gpu* && git commit   (the next lease goes on from them)
# MINUTES (default 4): no cell starts after it; a running cell may take about 3 more; the whole call stays
# under the tool's 10 minutes. WORKERS (default 12): cells side by side, one thread each, on the 16 cores.
set -uo pipefail
out=${OUT:?gpu_grid_v2.sh runs on the device, where OUT names the folder that comes back}
workers=${WORKERS:-12}; minutes=${MINUTES:-4}
[ -f .devcarry/commit ] || { echo "gpu_grid_v2.sh: no .devcarry/; run benchmarks/gpu_prepare.sh here and carry it." >&2; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .devcarry/whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MINI_GLUE_COMMIT=$(cat .devcarry/commit)
export MINI_GLUE_COMMIT
mkdir -p /tmp/glue && tar -xzf .devcarry/glue.tar.gz -C /tmp/glue || exit 1
python3 - <<'EOF' || exit 1
# the carried fp16 weights back to fp32, the grid's dtype (IVON refuses half-precision weights)
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

src, dst = Path(".devcarry/minilm"), Path("/tmp/minilm")
shutil.copytree(src, dst, dirs_exist_ok=True)
weights = load_file(src / "model.safetensors")
save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, dst / "model.safetensors",
          metadata={"format": "pt"})
EOF
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch, transformers, peft, ivon; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__)"
  echo "commit $MINI_GLUE_COMMIT, $workers workers, no new cell after $minutes minutes"
} 2>&1 | tee "$out/grid.log"
results=benchmarks/results/mini-glue-v2-gpu
timeout $((minutes * 60 + 200)) python3 benchmarks/grid_workers.py --pinned . --plan gpu --workers "$workers" \
  --minutes "$minutes" --glue-dir /tmp/glue --results "$results" --work /tmp/grid-runs \
  --extra-args "--model /tmp/minilm" 2>&1 | grep -v -i warn | tee -a "$out/grid.log"
mkdir -p "$results"
tar -czf "$out/mini-glue-v2-gpu.tar.gz" --exclude='*.partial' -C benchmarks/results mini-glue-v2-gpu
python3 benchmarks/mini_glue_v2.py --plan gpu --report --glue-dir /tmp/glue --results "$results" --out "$out" \
  2>&1 | grep -v -i warn | tail -25
