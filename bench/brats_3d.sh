#!/usr/bin/env bash
# 3D path end to end on real BraTS: FLAIR + T1c -> whole tumour; train on 3 cases, evaluate on the 4th.
#   bash bench/brats_3d.sh [minutes]       (default 8)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
MIN=${1:-8}
OUT=runs/brats
mkdir -p $OUT
[ -d runs/vlm/tiny-clip ] || $PY -m lib make-tiny-vlm runs/vlm/tiny-clip
$PY bench/brats_datalist.py "$DATA/brats_wt" "$OUT/datalist.json"
# validation = the 3 training cases (whole volumes, sliding windows): only to pick the checkpoint; the 4th is unseen
# a second run of this script evaluates the finished training again (train refuses a folder that holds a run)
if [ ! -f $OUT/run/train_result.json ]; then
  # (its log goes to train_time.txt: a failed training said nothing here, the script just stopped)
  /usr/bin/time -v $PY -m lib train --preset brats_wt --datalist $OUT/datalist.json --out $OUT/run --minutes "$MIN" \
    --no-progress 2> $OUT/train_time.txt | tee $OUT/train.json \
    || { grep -E "^error:|Error" $OUT/train_time.txt | tail -3 >&2; echo "training failed: $OUT/train_time.txt" >&2; exit 2; }
fi
grep -E "Elapsed|Maximum resident" $OUT/train_time.txt || true
$PY -m lib evaluate --checkpoint $OUT/run/best.pt --datalist $OUT/datalist.json --split test --out $OUT/eval_test --no-progress
