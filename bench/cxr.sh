#!/usr/bin/env bash
# The 2D figures: DFM+VLM (the preset's arch "cached", and arch "unet" where every sampler step runs the whole
# U-Net) and the plain U-Net baseline, each trained for the same CPU wall-time budget on cxr_lung/training, chosen
# on validation, evaluated on validation and test (Montgomery); plus the audit.
#   bash bench/cxr.sh [minutes]      (default 42: the budget includes the validations)
#   AVX2=1 bash bench/cxr.sh         behave like an AVX2-only CPU (PyTorch and oneDNN dispatch capped at AVX2;
#                                    precision "auto" then picks fp32), as the README's figures were measured
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}/cxr_lung/datalist.json
MIN=${1:-42}
[ -d runs/vlm/tiny-clip ] || $PY -m lib make-tiny-vlm runs/vlm/tiny-clip

[ -n "${AVX2:-}" ] && export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
for run in cached unet plain; do
  extra=(--set clicks.enabled=false)  # the architecture comparison, click-less as measured (bench/clicks.sh: the preset)
  [ $run = unet ] && extra+=(--set model.arch=unet)
  [ $run = plain ] && extra+=(--set model.mode=plain --set vlm.name_or_path=null)
  mkdir -p runs/cxr_$run
  if [ ! -f runs/cxr_$run/train_result.json ]; then
    $PY -m lib train --preset cxr_lung --datalist "$DATA" --out runs/cxr_$run --minutes "$MIN" "${extra[@]}" \
      --no-progress 2>&1 | tee runs/cxr_$run/train.log | grep -E "validation @|best_val|wall_seconds" || true
  fi
  for split in validation test; do
    $PY -m lib evaluate --checkpoint runs/cxr_$run/best.pt --datalist "$DATA" --split $split \
      --out runs/cxr_$run/eval_$split --no-progress 2>&1 | tail -1
  done
done
$PY -m lib audit --datalist "$DATA" --a validation --b test --label-threshold 127 --out runs/cxr_audit.json --no-progress
