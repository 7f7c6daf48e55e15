#!/usr/bin/env bash
# Issue 14's study (experiments/vwsl_study.py, configs/vwsl_gpu.json) on a GPU machine,
# installing NOTHING (python3 with jax for CUDA, flax, optax, orbax-checkpoint, numpy, scipy,
# pillow, matplotlib, tqdm). Resumable: every unit is skipped when its JSON exists, so a cut
# run goes on where it stopped when called again with the same OUT.
# DATA: folder with shenzhen/ and montgomery/ (default ../shared/data/cxr); OUT: work folder
# (default runs/gpu-vwsl); PROTOCOL (default configs/vwsl_gpu.json); VWSL_TIMEOUT: hard limit
# in s (default 560); SEED_WORK: a units folder copied in first, so that the study resumes from
# it (e.g. PROTOCOL=configs/vwsl_cpu.json SEED_WORK=results/vwsl_units runs the CPU protocol's
# remaining units on the GPU: about a minute each). Only the unit JSONs, metrics and weights
# come back in OUT/vwsl.tgz (no pictures of X-rays, no checkpoints).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
D=${DATA:-../shared/data/cxr}
O=${OUT:-runs/gpu-vwsl}
P=${PROTOCOL:-configs/vwsl_gpu.json}
mkdir -p "$O/units"
if [ -n "${SEED_WORK:-}" ]; then cp -r "$SEED_WORK"/. "$O/units/"; fi
python3 -c "import jax; print(jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$O/card.txt" || true
timeout "${VWSL_TIMEOUT:-560}" python3 experiments/vwsl_study.py --protocol "$P" --data "$D" \
  --work "$O/units" --results "$O/results" --compile-cache none 2>&1 | tee "$O/vwsl.log"
echo "vwsl_study exit: ${PIPESTATUS[0]}" | tee -a "$O/vwsl.log"
tar czf "$O/vwsl.tgz" --exclude=checkpoints --exclude='*.png' --exclude=uncertainty -C "$O" units results
