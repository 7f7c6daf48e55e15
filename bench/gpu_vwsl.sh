#!/usr/bin/env bash
# Issue 14's study (experiments/vwsl_study.py, configs/vwsl_gpu.json) on a GPU machine,
# installing NOTHING (python3 with jax for CUDA, flax, optax, orbax-checkpoint, numpy, scipy,
# pillow, matplotlib, tqdm). Resumable: every unit is skipped when its JSON exists, so a cut
# run goes on where it stopped when called again with the same OUT.
# DATA: folder with shenzhen/ and montgomery/ (default ../shared/data/cxr); OUT: work folder
# (default runs/gpu-vwsl); PROTOCOL (default configs/vwsl_gpu.json); VWSL_TIMEOUT: hard limit
# in s for all passes together (default 560); SEED_WORK: a units folder copied in first (only
# when OUT has no units yet, so that a second call never overwrites what the first one ran),
# so that the study resumes from it (e.g. PROTOCOL=configs/vwsl_cpu.json
# SEED_WORK=results/vwsl_units runs the CPU protocol's remaining units on the GPU);
# PASSES: study arguments for passes run one after another, separated by ';', most wanted
# first (e.g. "--directions shenzhen:montgomery --seeds 2;--directions montgomery:shenzhen"),
# so that a cut loses only the unit under way (default: one pass, everything).
# float32 matmuls run at full precision (no TF32), as on the CPU.
# Only the unit JSONs, evaluations, metrics and weights come back in OUT/vwsl.tgz (no
# pictures of X-rays, no checkpoints).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export JAX_DEFAULT_MATMUL_PRECISION=highest
D=${DATA:-../shared/data/cxr}
O=${OUT:-runs/gpu-vwsl}
P=${PROTOCOL:-configs/vwsl_gpu.json}
if [ -n "${SEED_WORK:-}" ] && [ ! -d "$O/units" ]; then
  mkdir -p "$O/units" && cp -r "$SEED_WORK"/. "$O/units/"
fi
mkdir -p "$O/units" "$O/results"
python3 -c "import jax; print(jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$O/card.txt" || true
end=$(( $(date +%s) + ${VWSL_TIMEOUT:-560} ))
IFS=';' read -ra passes <<< "${PASSES:-}"
[ ${#passes[@]} -eq 0 ] && passes=("")
for pass in "${passes[@]}"; do
  left=$(( end - $(date +%s) ))
  [ "$left" -le 5 ] && { echo "no time left for pass: $pass" | tee -a "$O/vwsl.log"; break; }
  echo "pass ($left s left): $pass" | tee -a "$O/vwsl.log"
  # shellcheck disable=SC2086  # a pass is a list of arguments
  timeout "$left" python3 experiments/vwsl_study.py --protocol "$P" --data "$D" \
    --work "$O/units" --results "$O/results" --compile-cache "$O/.jax_cache" $pass 2>&1 \
    | tee -a "$O/vwsl.log"
  echo "vwsl_study exit: ${PIPESTATUS[0]} at $(date +%s)" | tee -a "$O/vwsl.log"
done
tar czf "$O/vwsl.tgz" --exclude=checkpoints --exclude='*.png' --exclude=uncertainty \
  --exclude=.jax_cache -C "$O" units results
