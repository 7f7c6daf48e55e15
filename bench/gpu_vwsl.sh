#!/usr/bin/env bash
# Issue 14's study on a GPU machine: bench/gpu_units.sh vwsl (its header lists DATA, OUT,
# PROTOCOL, SEED_WORK, PASSES and TIMEOUT; VWSL_TIMEOUT is still read as TIMEOUT). The default
# protocol, configs/vwsl_gpu.json, trains the sources with the paper's full protocol;
# PROTOCOL=configs/vwsl_cpu.json SEED_WORK=results/vwsl_units runs the CPU protocol's remaining
# units (session 14 ran all of them on an H200 in 13.5 minutes, results/README.md).
# Comes back: OUT/vwsl.tgz.
TIMEOUT=${TIMEOUT:-${VWSL_TIMEOUT:-560}} exec bash "$(dirname "$0")/gpu_units.sh" vwsl
