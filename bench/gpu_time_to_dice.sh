#!/usr/bin/env bash
# Time-to-Dice curves (experiments/time_to_dice.py, configs/time_to_dice.json) on a GPU machine,
# installing NOTHING (same assumptions as bench/gpu.sh: python3 with jax for CUDA, flax, optax,
# orbax-checkpoint, numpy, pillow, matplotlib, tqdm). The curves are kept in optimizer steps, so
# they are projected to this project's CPU afterwards with bench.py figures measured there:
#   python experiments/time_to_dice.py --protocol configs/time_to_dice.json --publish-only \
#     --work WORK --cpu-bench results/bench/cpu-2core-*.json
# DATA: folder with shenzhen/{images,masks} and the cases of results/splits/shenzhen_{train,val}
# (default ../shared/data/cxr); OUT: output folder (default runs/gpu); DEADLINE_MIN: start no
# variant after this many minutes (default 6.5); TTD_TIMEOUT: hard limit in s (default 500).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
D=${DATA:-../shared/data/cxr}
O=${OUT:-runs/gpu}
P=${PROTOCOL:-configs/time_to_dice.json}
mkdir -p "$O"
python3 -c "import jax; print(jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$O/card.txt" || true
timeout "${TTD_TIMEOUT:-500}" python3 experiments/time_to_dice.py --protocol "$P" --data "$D" \
  --work "$O/ttd" --results "$O/results" --deadline-min "${DEADLINE_MIN:-6.5}" \
  --compile-cache none 2>&1 | tee "$O/ttd.log"
echo "time_to_dice exit: ${PIPESTATUS[0]}" | tee -a "$O/ttd.log"
tar czf "$O/ttd.tgz" --exclude=checkpoints --exclude='*.npz' --exclude='*.png' -C "$O" ttd
