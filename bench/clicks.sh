#!/usr/bin/env bash
# Interactive segmentation, measured: click-trained models and the robot users (bench/clicks_bench.py).
#   bash bench/clicks.sh cxr      cxr_lung: train the preset (clicks trained in; 42 min, AVX2 dispatch like bench/cxr.sh AVX2=1),
#                                 evaluate the automatic mode, robots on validation and test
#   SIGMA=2 bash bench/clicks.sh cxr|hold|brats   click maps of sigma 2 network voxels (default 3) -> runs/*_s2
#   bash bench/clicks.sh brats    BraTS: train with clicks on 3 cases (20 min; the preset's flood-fill clicks), evaluate case 0006, robots,
#                                 then the sampler's hold of clicked voxels (radius -1/1/3) on case 0006
#   bash bench/clicks.sh hold     cxr_lung validation (first 20): the sampler's hold of clicked voxels, radius -1/0/2
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
SIGMA=${SIGMA:-3}
[ -d runs/vlm/tiny-clip ] || $PY -m lib make-tiny-vlm runs/vlm/tiny-clip
case "${1:-cxr}" in
cxr)
  OUT=runs/cxr_clicks_s$SIGMA
  mkdir -p $OUT
  if [ ! -f $OUT/train_result.json ]; then
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $PY -m lib train --preset cxr_lung \
      --datalist $DATA/cxr_lung/datalist.json --out $OUT --minutes "${MIN:-42}" \
      --set clicks.sigma=$SIGMA --no-progress \
      > $OUT/train.log 2>&1
  fi
  for split in validation test; do
    $PY -m lib evaluate --checkpoint $OUT/best.pt --datalist $DATA/cxr_lung/datalist.json --split $split \
      --out $OUT/eval_$split --no-progress 2>&1 | tail -1
  done
  $PY bench/clicks_bench.py --checkpoint $OUT/best.pt --datalist $DATA/cxr_lung/datalist.json \
    --split validation test --robots oracle --out runs/bench/clicks_cxr_s$SIGMA
  $PY bench/clicks_bench.py --checkpoint $OUT/best.pt --datalist $DATA/cxr_lung/datalist.json \
    --split test --robots uncertain --out runs/bench/clicks_cxr_uncertain_s$SIGMA
  ;;
hold)
  $PY bench/clicks_bench.py --checkpoint runs/cxr_clicks_s$SIGMA/best.pt --datalist $DATA/cxr_lung/datalist.json \
    --split validation --limit 20 --clicks 5 --robots oracle --hold-radius -1 0 2 --out runs/bench/clicks_cxr_hold_s$SIGMA
  ;;
brats)
  OUT=runs/brats_clicks_s$SIGMA
  mkdir -p $OUT
  [ -f runs/brats/datalist.json ] || $PY bench/brats_datalist.py $DATA/brats_wt runs/brats/datalist.json
  if [ ! -f $OUT/train_result.json ]; then
    $PY -m lib train --preset brats_wt --datalist runs/brats/datalist.json --out $OUT --minutes "${MIN:-20}" \
      --set clicks.enabled=true --set clicks.no_click_prob=0.5 --set clicks.sigma=$SIGMA --no-progress \
      > $OUT/train.log 2>&1
  fi
  $PY -m lib evaluate --checkpoint $OUT/best.pt --datalist runs/brats/datalist.json --split test \
    --out $OUT/eval_test --no-progress 2>&1 | tail -1
  # test = case 0006 (held out); validation = the 3 training cases (the dev cases)
  $PY bench/clicks_bench.py --checkpoint $OUT/best.pt --datalist runs/brats/datalist.json \
    --split test validation --robots oracle uncertain --num-samples 4 --out runs/bench/clicks_brats_s$SIGMA
  $PY bench/clicks_bench.py --checkpoint $OUT/best.pt --datalist runs/brats/datalist.json \
    --split test --robots oracle --num-samples 4 --clicks 5 --hold-radius -1 1 3 --out runs/bench/clicks_brats_hold_s$SIGMA
  ;;
*) echo "usage: bash bench/clicks.sh cxr|hold|brats"; exit 2 ;;
esac
