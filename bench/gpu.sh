#!/usr/bin/env bash
# GPU benchmark, under 5 minutes, installing NOTHING. Assumes the machine already has python3
# with jax + jaxlib built for CUDA, flax, optax, orbax-checkpoint, numpy, scipy, pillow, tqdm and
# matplotlib importable (as on the lent GPU machines); the project is used from this checkout via
# PYTHONPATH. Writes OUT (default results/bench/gpu): card.txt, bench.json, protocol.json.
#   1. bench.py at 256 px, 50 steps per level, batch 4 and 16 (training step, prediction,
#      10-sample variance vmap vs loop, matmul rate);
#   2. the paper's FULL protocol config (configs/paper.json: batch 16, 50 steps per level) for a
#      fixed 10 optimizer steps on 32 phantoms, and the projected time of its 1500 epochs of 50
#      images (3 steps per epoch, 4,500 steps).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/bench/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import jax; d = jax.devices(); print(d); assert d[0].platform == 'gpu', 'no GPU seen by JAX'"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/card.txt" || true
timeout 220 python3 bench.py --size 256 --steps 50 --batch 4 16 --reps 5 --autodiff-baseline \
  --json "$OUT/bench.json"
RUN=$(mktemp -d)/paper
timeout 80 python3 train.py --config configs/paper.json --epochs 5 --phantoms 32 --out "$RUN" \
  --no-progress
python3 - "$RUN" "$OUT/protocol.json" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1] + "/metrics.jsonl")]
steps = rows[0]["step"]  # optimizer steps per epoch
warm = [r["epoch_s"] / steps for r in rows[1:]]  # epoch 0 includes compilation
per_step = sorted(warm)[len(warm) // 2]
res = {"config": "configs/paper.json", "batch": 16, "steps_measured": rows[-1]["step"],
       "seconds_per_step": per_step, "first_epoch_s_incl_compile": rows[0]["epoch_s"],
       "projected_paper_training_h": per_step * 3 * 1500 / 3600}
json.dump(res, open(sys.argv[2], "w"), indent=2)
print(res)
PY
