#!/usr/bin/env bash
# The on-device (LiteRT-only) runs of results/README.md, "TFLite". Writes under runs/device/.
#  1. export an UNTRAINED model and train it only through the .tflite file on 50 Shenzhen images
#     (8 epochs at batch 1 = 400 train calls), then score it in JAX on 50 Shenzhen test images;
#  2. export the cpu60 Shenzhen run and fine-tune it with VWSL on the device on 9 unlabelled
#     Montgomery images (5 epochs = 45 finetune calls; lr 3.6e-5 = the authors' 3e-6 x 12, which
#     keeps lr x steps equal to their 600 steps), then score before and after on 50 Montgomery
#     test images (1 sample each, eval seed 0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
D=${DATA:-../shared/data/cxr}
O=runs/device
mkdir -p $O
$PY export_tflite.py --config configs/cpu60.json --init-seed 0 --out $O/untrained.tflite
$PY -m nca_jax.device_train train --model $O/untrained.tflite --data $D/shenzhen \
  --split results/splits/shenzhen_train.txt --epochs 8 --out $O/shenzhen-device-train --log-every 25
$PY evaluate.py --run $O/shenzhen-device-train --data $D/shenzhen \
  --split results/splits/shenzhen_test.txt --samples 1 --no-png --out $O/eval-device-train-shenzhen
$PY export_tflite.py --run results/runs/shenzhen-seed0 --finetune-lr 3.6e-5 --out $O/shenzhen-seed0.tflite
$PY -m nca_jax.device_train finetune --model $O/shenzhen-seed0.tflite --data $D/montgomery \
  --split results/splits/montgomery_device_ft9.txt --epochs 5 --out $O/vwsl-device-montgomery --log-every 10
for r in $O/vwsl-device-montgomery results/runs/shenzhen-seed0; do
  $PY evaluate.py --run $r --data $D/montgomery --split results/splits/montgomery_test.txt \
    --samples 1 --no-png --out $O/eval-$(basename $r)-montgomery
done
