#!/usr/bin/env bash
# Issue 16's Table 1 runs (experiments/table1.py, configs/table1_cpu.json) on a GPU machine,
# installing NOTHING (python3 with jax for CUDA, flax, optax, orbax-checkpoint, numpy, scipy,
# pillow, matplotlib, tqdm). The budget stays the CPU's: every model trains the epochs that
# 60 minutes buy on the 2-core CPU (results/bench/table1-steps.json), so the runs are those of
# the CPU protocol, only faster; the table marks their minutes as the GPU's. The phone column
# is not measured here (LiteRT on the CPU, `--phone`). Resumable: a unit whose JSON exists is
# skipped, so a cut run goes on when called again with the same OUT.
# DATA (default ../shared/data/cxr); OUT (default runs/gpu-table1); T1_TIMEOUT: hard limit in
# s (default 560). The unit JSONs, metrics and small weights come back in OUT/table1.tgz (no
# checkpoints, no weights of the 37M UNet).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
D=${DATA:-../shared/data/cxr}
O=${OUT:-runs/gpu-table1}
mkdir -p "$O"
python3 -c "import jax; print(jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$O/card.txt" || true
timeout "${T1_TIMEOUT:-560}" python3 experiments/table1.py --protocol configs/table1_cpu.json \
  --data "$D" --work "$O/units" --results "$O/results" --compile-cache none 2>&1 | tee "$O/table1.log"
echo "table1 exit: ${PIPESTATUS[0]}" | tee -a "$O/table1.log"
tar czf "$O/table1.tgz" --exclude=checkpoints --exclude='*-unet/*.npz' --exclude=phone -C "$O" units results
