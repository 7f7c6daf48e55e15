#!/usr/bin/env bash
# Set-up + the whole test suite (slow tests included). Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not slow"` for the fast part only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
