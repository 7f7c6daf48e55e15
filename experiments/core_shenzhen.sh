#!/usr/bin/env bash
# The core issue's measurement: train on 50 Shenzhen images (checkpoint picked on 50 other
# Shenzhen images), test on 50 held-out Shenzhen and 50 Montgomery images (seed 0), then copy
# the small results (config, weights, metrics, summaries; no images) under results/.
# Usage: bash experiments/core_shenzhen.sh [WORK=runs]   (resumable: re-run after interruption)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs}
D=${DATA:-../shared/data/cxr}
PY=${PY:-.venv/bin/python}
RUN=$W/shenzhen-seed0
if [ -f "$RUN/run.json" ]; then :
elif [ -d "$RUN/checkpoints" ]; then
  $PY train.py --data $D/shenzhen --split results/splits/shenzhen_train.txt --val $D/shenzhen \
    --val-split results/splits/shenzhen_val.txt --out $RUN --config configs/cpu60.json --seed 0 \
    --no-progress --resume
else
  $PY train.py --data $D/shenzhen --split results/splits/shenzhen_train.txt --val $D/shenzhen \
    --val-split results/splits/shenzhen_val.txt --out $RUN --config configs/cpu60.json --seed 0 \
    --no-progress
fi
for site in shenzhen montgomery; do
  [ -f "$W/shenzhen-seed0-test-$site/summary.json" ] || \
    $PY evaluate.py --run $RUN --data $D/$site --split results/splits/${site}_test.txt \
      --out $W/shenzhen-seed0-test-$site --samples 10 --seed 0
done
mkdir -p results/runs/shenzhen-seed0 results/core
cp $RUN/config.json $RUN/weights.npz $RUN/run.json $RUN/metrics.jsonl $RUN/training_curve.png \
  results/runs/shenzhen-seed0/
for site in shenzhen montgomery; do
  cp $W/shenzhen-seed0-test-$site/summary.json results/core/shenzhen-seed0_test-$site.json
done
