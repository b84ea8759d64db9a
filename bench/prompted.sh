#!/usr/bin/env bash
# Prompted models (several structures, each chosen by its text prompt): the README's "Prompted models" figures.
#   bash bench/prompted.sh cxr [minutes]     cxr_lung_prompted (lungs, right lung, left lung), AVX2 dispatch as the
#                                            single-label cxr_lung run it is compared with (default 42 min)
#   bash bench/prompted.sh brats [minutes]   brats_prompted (WT, TC, ET) for M minutes vs one single-structure model
#                                            per structure for M/3 minutes each (the same total budget; default 12)
# evaluate writes summary.json with the Dice per structure and the wrong-prompt matrix (prompt x truth).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
RES=bench/results/prompted
mkdir -p $RES runs
[ -d runs/vlm/tiny-clip ] || $PY -m lib make-tiny-vlm runs/vlm/tiny-clip
$PY -c "import torch; print('cpu capability', torch.backends.cpu.get_cpu_capability())"
case "${1:-}" in
  cxr)
    MIN=${2:-42}
    OUT=runs/cxr_prompted
    # (a second run of this script re-evaluates finished trainings: train refuses a folder that holds a run)
    [ -f $OUT/train_result.json ] || ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $PY -m lib train \
      --preset cxr_lung_prompted --datalist $DATA/cxr_lung/datalist.json --out $OUT --minutes "$MIN" --no-progress \
      | tee $OUT.train.json
    for split in validation test; do
      ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $PY -m lib evaluate --checkpoint $OUT/best.pt \
        --datalist $DATA/cxr_lung/datalist.json --split $split --out $OUT/eval_$split --no-progress
      cp $OUT/eval_$split/summary.json $RES/cxr_$split.json
    done
    cp $OUT/history.json $RES/cxr_history.json
    ;;
  brats)
    MIN=${2:-12}
    ONE=$($PY -c "print(round($MIN / 3, 2))")
    $PY bench/brats_datalist.py "$DATA/brats_wt" runs/brats/datalist.json
    [ -f runs/brats_prompted/train_result.json ] || $PY -m lib train --preset brats_prompted \
      --datalist runs/brats/datalist.json --out runs/brats_prompted --minutes "$MIN" --no-progress \
      | tee runs/brats_prompted.train.json
    $PY -m lib evaluate --checkpoint runs/brats_prompted/best.pt --datalist runs/brats/datalist.json --split test \
      --out runs/brats_prompted/eval_test --no-progress
    cp runs/brats_prompted/eval_test/summary.json $RES/brats_prompted_test.json
    for s in whole_tumour tumour_core enhancing_tumour; do
      [ -f runs/brats_single_$s/train_result.json ] || $PY -m lib train --preset brats_prompted --structures $s \
        --datalist runs/brats/datalist.json --out runs/brats_single_$s --minutes "$ONE" --no-progress \
        | tee runs/brats_single_$s.train.json
      $PY -m lib evaluate --checkpoint runs/brats_single_$s/best.pt --datalist runs/brats/datalist.json \
        --split test --out runs/brats_single_$s/eval_test --no-progress
      cp runs/brats_single_$s/eval_test/summary.json $RES/brats_single_${s}_test.json
    done
    ;;
  *) echo "usage: bash bench/prompted.sh cxr|brats [minutes]" >&2; exit 2 ;;
esac
