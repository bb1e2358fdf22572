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
#
# Then, while less than EXTRA_BEFORE_S seconds (default 450) have passed, so that the whole
# command ends within about 9.5 minutes:
# - bench/mhc_kernel_variants.py times each mHC kernel alone in the variants worth choosing
#   between (tiles, the backward's dot precision), with its error against fp64 (about a minute);
# - where liger-kernel imports, bench/mhc_liger.py compares its mHC ops with llmkit's (about a
#   minute). For a GPU machine without network, unpack its wheel into .cache/liger (ignored by
#   git) where there is network, and bring that folder along:
#   pip download liger-kernel==0.8.5 --no-deps -d /tmp/w && python -m zipfile -e /tmp/w/*.whl .cache/liger
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
EXTRA_BEFORE_S="${EXTRA_BEFORE_S:-450}"
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    echo "gpu_check: no CUDA device: '$PYTHON' cannot import torch or torch.cuda.is_available() is False; run this on a GPU machine" >&2
    exit 2
fi
[ -d .cache/liger ] && export PYTHONPATH="$PYTHONPATH:$PWD/.cache/liger"
status=0
"$PYTHON" -m bench.gpu_check "$@" || status=$?
if [ "$SECONDS" -lt "$EXTRA_BEFORE_S" ]; then
    "$PYTHON" -m bench.mhc_kernel_variants || status=$?
else
    echo "gpu_check: ${SECONDS} s have passed; bench/mhc_kernel_variants.py not run"
fi
if ! "$PYTHON" -c 'import liger_kernel' >/dev/null 2>&1; then
    echo "gpu_check: liger-kernel does not import here; its comparison (bench/mhc_liger.py) not run"
elif [ "$SECONDS" -lt "$EXTRA_BEFORE_S" ]; then
    "$PYTHON" -m bench.mhc_liger || status=$?
else
    echo "gpu_check: ${SECONDS} s have passed; bench/mhc_liger.py not run"
fi
exit "$status"
