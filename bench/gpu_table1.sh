#!/usr/bin/env bash
# Issue 16's Table 1 runs (configs/table1_cpu.json) on a GPU machine: bench/gpu_units.sh table1
# (its header lists DATA, OUT, PROTOCOL, SEED_WORK, PASSES and TIMEOUT; T1_TIMEOUT is still
# read as TIMEOUT). The budget stays the CPU's: every model trains the epochs that 60 minutes
# buy on the 2-core CPU (results/bench/table1-steps.json), so the runs are those of the CPU
# protocol, only faster; the table marks their minutes as the GPU's. The phone column is not
# measured there (LiteRT on the CPU, `--phone`). SEED_WORK=results/table1_units resumes the
# committed runs. Comes back: OUT/table1.tgz (no checkpoints, no weights of the 37M UNet).
TIMEOUT=${TIMEOUT:-${T1_TIMEOUT:-560}} exec bash "$(dirname "$0")/gpu_units.sh" table1
