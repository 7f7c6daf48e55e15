#!/usr/bin/env bash
# Issue 14's phone-capture experiment (configs/capture_strong_cpu.json: moderate and severe
# captures of Montgomery, VWSL with the defaults on 16 and 5 captured images, seeds 0 and 1)
# on a GPU machine: bench/gpu_units.sh capture (its header lists DATA, OUT, PROTOCOL,
# SEED_WORK, PASSES and TIMEOUT). SEED_WORK=results/capture_units resumes the committed units;
# the captured X-rays are made again there from DATA (the same capture seed) and never come
# back. Comes back: OUT/capture.tgz.
exec bash "$(dirname "$0")/gpu_units.sh" capture
