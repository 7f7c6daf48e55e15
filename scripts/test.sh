#!/usr/bin/env bash
# Set-up + the whole test suite (slow tests included), one pytest-xdist worker per core (the
# suite takes 1.5x less time on 2 cores than in one process). Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not slow"` for the fast part only, `-n 0` for one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n auto "$@"
