#!/usr/bin/env bash
# Mini-GLUE v2's GPU plan (mini_glue_v2.py --plan gpu: 5 seeds on every task, runs of several
# epochs) on a lent device, as many cells as one call's time allows; it resumes from the committed cells.
#   Here, after every commit that changes src/ or benchmarks/:   bash benchmarks/gpu_prepare.sh
#   Device tool:  run(command="bash benchmarks/gpu_grid_v2.sh", carry=[".devcarry"], timeout_s=600)
#   Back here:    tar -xzf FILES_AT/mini-glue-v2-gpu.tar.gz -C benchmarks/results
#                 python benchmarks/mini_glue_v2.py --plan gpu --report --glue-dir ../shared/data/glue
#                 git add benchmarks/results/mini-glue-v2-gpu* && git commit   (the next lease goes on from them)
# BUDGET (default 540): seconds this script may take in all, inside the tool's 600; the grid is stopped 60 s
# before it, so the cells come back whatever happens, and no cell starts after BUDGET - CELL_SECONDS (default
# 300: a cell's time, 12 side by side, is not measured yet; the first lease's grid.log tells it). WORKERS
# (default 12): cells side by side, one thread each, on the 16 cores.
set -uo pipefail
out=${OUT:?gpu_grid_v2.sh runs on the device, where OUT names the folder that comes back}
budget=${BUDGET:-540}; cell_seconds=${CELL_SECONDS:-300}; workers=${WORKERS:-12}
[ -f .devcarry/commit ] || { echo "gpu_grid_v2.sh: no .devcarry/; run benchmarks/gpu_prepare.sh here and carry it." >&2; exit 1; }
# the code must be the commit the cells will record: compare every file's git blob hash with gpu_prepare.sh's list
python3 - <<'PY' || exit 1
import hashlib
import sys
from pathlib import Path

listed = {line.split("\t", 1)[1]: line.split()[1] for line in Path(".devcarry/code.ls").read_text().splitlines()}
here = {str(p) for p in Path("src").rglob("*.py")}
here |= {str(p) for p in Path("benchmarks").glob("*.py")}


def blob(path):
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


differ = sorted(p for p in here | set(listed) if p not in listed or p not in here or blob(p) != listed[p])
if differ:
    sys.exit(f"gpu_grid_v2.sh: {differ[0]} (and {len(differ) - 1} more) differ from the commit .devcarry "
             "records; run benchmarks/gpu_prepare.sh again after committing.")
PY
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .devcarry/whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MINI_GLUE_COMMIT=$(cat .devcarry/commit)
export MINI_GLUE_COMMIT
mkdir -p /tmp/glue && tar -xzf .devcarry/glue.tar.gz -C /tmp/glue || exit 1
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch, transformers, peft, ivon; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$out/grid.log"
left=$((budget - 60 - SECONDS))
minutes=$(awk -v s="$((left - cell_seconds))" 'BEGIN { printf "%.2f", (s > 0 ? s : 0) / 60 }')
echo "commit $MINI_GLUE_COMMIT; $workers workers; the grid gets $left s, no new cell after $minutes minutes" \
  | tee -a "$out/grid.log"
results=benchmarks/results/mini-glue-v2-gpu
timeout "$left" python3 benchmarks/grid_workers.py --pinned . --plan gpu --workers "$workers" \
  --minutes "$minutes" --glue-dir /tmp/glue --results "$results" --work /tmp/grid-runs \
  --extra-args "--model .devcarry/minilm" 2>&1 | grep --line-buffered -v -i warn | tee -a "$out/grid.log"
mkdir -p "$results"
tar -czf "$out/mini-glue-v2-gpu.tar.gz" --exclude='*.partial' -C benchmarks/results mini-glue-v2-gpu
timeout 50 python3 benchmarks/mini_glue_v2.py --plan gpu --report --glue-dir /tmp/glue --results "$results" \
  --out "$out" 2>&1 | grep -v -i warn | tail -25
