#!/usr/bin/env bash
# The same training + evaluation, briefly (about 5 minutes), on a CUDA machine that has PyTorch but no internet.
#
#   On a machine WITH internet (here), fetch the wheels the GPU machine lacks, beside the repo:
#       bash bench/gpu.sh fetch              # -> .whl/ (Python 3.12, manylinux x86_64)
#   Copy the chest X-ray data into the repo tree if the GPU machine cannot see ../shared (git-ignored, never
#   committed; the 2026-11-27 run carried all validation/test cases and the first 211 of 266 training cases, to
#   fit the 64 MiB a lent machine receives):
#       DATA=/path/to/copy bash bench/gpu.sh
#   On the GPU machine:
#       bash bench/gpu.sh                    # installs .whl/*.whl into /tmp/site, trains 4 min, evaluates
#
# Output goes to GPU_OUT (default runs/gpu). First bench/cuda_checks.py (same seed across sw_batch_size 1/4/8 on
# CUDA, fp32 and the policy's bf16; fp32 vs bf16 training-step time), then the sampler cost ratios (one plain pass vs Euler K = 8, M = 8 batched vs sequential; bench/speed_bench.py) and a
# 240x240x155 two-channel volume with seconds and peak GPU memory (bench/volume_bench.py), then the training log and
# the validation/test Dice of `python -m lib evaluate` with its seconds.
# A machine with a recent PyTorch stack (the lent H200: torch 2.11, numpy 2, transformers 5.17) lacks only MONAI and
# nibabel: `pip download --no-deps monai==1.6.1 nibabel==5.4.2 -d .whl` (platform flags as below) is all it needs.
#   QUICK=1 bash bench/gpu.sh    only the two benches (about 1 minute)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
PYV=${PYV:-3.12}

if [ "${1:-}" = fetch ]; then
  mkdir -p "$WHEELS"
  # everything lib/ needs besides torch (the GPU machine has torch); versions as in requirements.txt
  pkgs=$(grep -E '^(monai|transformers|tokenizers|safetensors|huggingface-hub|hf-xet|nibabel|tqdm|scipy|pillow|numpy|regex|pyyaml|filelock|fsspec|packaging|typing-extensions|scikit-image|imageio|tifffile|lazy-loader|networkx|httpx|httpcore|h11|anyio|idna|certifi|sniffio|typer|click|shellingham|rich|markdown-it-py|mdurl|pygments|annotated-doc)==' requirements.txt)
  python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$WHEELS" $pkgs
  exit 0
fi

PY=${PY:-python3}
if [ -d "$WHEELS" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
DATA=${DATA:-../shared/data}
GPU_OUT=${GPU_OUT:-runs/gpu}
mkdir -p "$GPU_OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
[ -d runs/vlm/tiny-clip ] || $PY -m lib make-tiny-vlm runs/vlm/tiny-clip
start=$(date +%s)
$PY bench/cuda_checks.py --device cuda --datalist "$DATA/cxr_lung/datalist.json" --out "$GPU_OUT/cuda_checks.json"
$PY bench/speed_bench.py --device cuda --windows 36 --repeats 5 --precision auto --out "$GPU_OUT/speed_bench.json"
$PY bench/volume_bench.py --device cuda --sw-batch-size 16 --out "$GPU_OUT/volume_bench.json"
if [ -n "${QUICK:-}" ]; then echo "total seconds: $(( $(date +%s) - start ))"; exit 0; fi
$PY -m lib train --preset cxr_lung --datalist "$DATA/cxr_lung/datalist.json" --out "$GPU_OUT/cxr_dfm" --minutes 4 \
  --device cuda --set train.images_per_batch=16 --set train.val_every_s=60 --set sampler.sw_batch_size=36 --no-progress
for split in validation test; do
  $PY -m lib evaluate --checkpoint "$GPU_OUT/cxr_dfm/best.pt" --datalist "$DATA/cxr_lung/datalist.json" --split $split \
    --out "$GPU_OUT/cxr_dfm/eval_$split" --device cuda --no-progress
done
echo "total seconds: $(( $(date +%s) - start ))"
