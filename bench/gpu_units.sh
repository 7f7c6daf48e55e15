#!/usr/bin/env bash
# Runs one of the unit-based experiments on a lent GPU machine, installing NOTHING (python3
# with jax for CUDA, flax, optax, orbax-checkpoint, numpy, scipy, pillow, matplotlib, tqdm):
#   bash bench/gpu_units.sh vwsl      issue 14: experiments/vwsl_study.py
#   bash bench/gpu_units.sh table1    issue 16: experiments/table1.py
#   bash bench/gpu_units.sh capture   issue 14, point 5: experiments/capture_experiment.py
# Every experiment skips a unit whose JSON exists, so a cut run goes on where it stopped when
# called again with the same OUT. Environment:
#   DATA       folder with shenzhen/ and montgomery/ (default ../shared/data/cxr; that folder
#              does not travel to a device machine: copy it into a git-ignored folder of the
#              checkout, carry it and name it here)
#   OUT        work folder (default runs/gpu-KIND)
#   PROTOCOL   the experiment's protocol (defaults below)
#   SEED_WORK  a units folder copied in first, only when OUT has none yet (a second call never
#              overwrites what the first ran), so that the experiment resumes from the committed
#              units, e.g. SEED_WORK=results/vwsl_units
#   PASSES     the experiment's own arguments for passes run one after another, separated by
#              ';', most wanted first, so that a cut loses only the unit under way
#              (default: one pass, everything)
#   TIMEOUT    hard limit in s for all passes together (default 560)
# float32 matmuls run at full precision (no TF32), as on the CPU. What comes back is
# OUT/KIND.tgz: unit JSONs, evaluations, metrics and small weights; never checkpoints, pictures
# of X-rays, captured X-rays or compile caches.
set -uo pipefail
cd "$(dirname "$0")/.."
KIND=${1:?usage: bench/gpu_units.sh vwsl|table1|capture}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export JAX_DEFAULT_MATMUL_PRECISION=highest
D=${DATA:-../shared/data/cxr}
O=${OUT:-runs/gpu-$KIND}
CACHE=(--compile-cache "$O/.jax_cache")
EXCLUDE=(--exclude=checkpoints --exclude='*.png' --exclude=uncertainty --exclude=.jax_cache)
case "$KIND" in
  vwsl) SCRIPT=experiments/vwsl_study.py; P=${PROTOCOL:-configs/vwsl_gpu.json} ;;
  table1) SCRIPT=experiments/table1.py; P=${PROTOCOL:-configs/table1_cpu.json}
    EXCLUDE+=(--exclude='*-unet/*.npz' --exclude=phone) ;;
  capture) SCRIPT=experiments/capture_experiment.py; P=${PROTOCOL:-configs/capture_strong_cpu.json}
    CACHE=(); EXCLUDE+=(--exclude='captured-*' --exclude=figures) ;;
  *) echo "unknown experiment '$KIND': vwsl, table1 or capture" >&2; exit 2 ;;
esac
if [ -n "${SEED_WORK:-}" ] && [ ! -d "$O/units" ]; then
  mkdir -p "$O/units" && cp -r "$SEED_WORK"/. "$O/units/"
fi
mkdir -p "$O/units" "$O/results"
python3 -c "import jax; print(jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$O/card.txt" || true
end=$(( $(date +%s) + ${TIMEOUT:-560} ))
IFS=';' read -ra passes <<< "${PASSES:-}"
[ ${#passes[@]} -eq 0 ] && passes=("")
for pass in "${passes[@]}"; do
  left=$(( end - $(date +%s) ))
  [ "$left" -le 5 ] && { echo "no time left for pass: $pass" | tee -a "$O/$KIND.log"; break; }
  echo "pass ($left s left): $pass" | tee -a "$O/$KIND.log"
  # shellcheck disable=SC2086  # a pass is a list of arguments
  timeout "$left" python3 "$SCRIPT" --protocol "$P" --data "$D" --work "$O/units" \
    --results "$O/results" "${CACHE[@]}" $pass 2>&1 | tee -a "$O/$KIND.log"
  echo "$KIND exit: ${PIPESTATUS[0]} at $(date +%s)" | tee -a "$O/$KIND.log"
done
tar czf "$O/$KIND.tgz" "${EXCLUDE[@]}" -C "$O" units results
