#!/usr/bin/env bash
# The GPU check of the issue's targets in one command (what it measures: bench/gpu_check.py):
#
#   bash bench/gpu_check.sh                  # on an H100/H200: one markdown table, JSON to
#                                            # $OUT/gpu_check.json or lightning_logs/bench/gpu_check.json
#   bash bench/gpu_check.sh --skip-pytest    # any option of `python3 -m bench.gpu_check --help`
#
# Runs from the repository root with it on PYTHONPATH (llmkit need not be installed); PYTHON
# picks the interpreter (default python3). Exits 2 with one line when that python sees no GPU;
# for a CPU smoke run call `python -m bench.gpu_check ... --device cpu` directly.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    echo "gpu_check: no CUDA device: '$PYTHON' cannot import torch or torch.cuda.is_available() is False; run this on a GPU machine" >&2
    exit 2
fi
exec "$PYTHON" -m bench.gpu_check "$@"
