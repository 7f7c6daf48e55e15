#!/usr/bin/env bash
# Set-up + the end-to-end demo on the embedded phantoms (train -> evaluate -> figures).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python demo.py --out "${1:-demo-out}"
