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
# Everything it prints also goes to gpu_check_console.log beside the JSON (in $OUT when set), since
# a remote runner may hand back only the end of the console.
#
# Then three extras, each only where its usual time still fits before LIMIT_S seconds (default 540,
# 9 minutes) have passed since the start (gpu_check.py itself is meant to end within 8 minutes):
# - bench/mhc_host_overhead.py: the host time of one mHC sublayer's ops (about 30 s);
# - where liger-kernel imports, bench/mhc_liger.py compares its mHC ops with llmkit's (about a
#   minute). For a GPU machine without network, unpack its wheel into .cache/liger (ignored by
#   git: a remote runner must be told to carry it) where there is network, and bring it along:
#   pip download liger-kernel==0.8.5 --no-deps -d /tmp/w && python -m zipfile -e /tmp/w/*.whl .cache/liger
# - bench/mhc_kernel_variants.py times each mHC kernel alone in the variants worth choosing
#   between (tiles), with its error against fp64 (about 2.5 minutes: an estimate, with more
#   variants than it last ran on an H200).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
LIMIT_S="${LIMIT_S:-540}"
HOST_S=30  # the extras' usual times on an H200 (estimates where not yet run there)
VARIANTS_S=150
LIGER_S=60
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    echo "gpu_check: no CUDA device: '$PYTHON' cannot import torch or torch.cuda.is_available() is False; run this on a GPU machine" >&2
    exit 2
fi
LOG_DIR="${OUT:-lightning_logs/bench}"
mkdir -p "$LOG_DIR"
exec > >(tee -a "$LOG_DIR/gpu_check_console.log") 2>&1
[ -d .cache/liger ] && export PYTHONPATH="$PYTHONPATH:$PWD/.cache/liger"
status=0
"$PYTHON" -m bench.gpu_check "$@" || status=$?
if [ $((SECONDS + HOST_S)) -le "$LIMIT_S" ]; then
    "$PYTHON" -m bench.mhc_host_overhead || status=$?
else
    echo "gpu_check: ${SECONDS} s have passed; bench/mhc_host_overhead.py (about ${HOST_S} s) not run"
fi
if ! "$PYTHON" -c 'import liger_kernel' >/dev/null 2>&1; then
    echo "gpu_check: liger-kernel does not import here; its comparison (bench/mhc_liger.py) not run"
elif [ $((SECONDS + LIGER_S)) -le "$LIMIT_S" ]; then
    "$PYTHON" -m bench.mhc_liger || status=$?
else
    echo "gpu_check: ${SECONDS} s have passed; bench/mhc_liger.py (about ${LIGER_S} s) not run"
fi
if [ $((SECONDS + VARIANTS_S)) -le "$LIMIT_S" ]; then
    "$PYTHON" -m bench.mhc_kernel_variants || status=$?
else
    echo "gpu_check: ${SECONDS} s have passed; bench/mhc_kernel_variants.py (about ${VARIANTS_S} s) not run"
fi
exec 1>&- 2>&-  # tee sees the end of its input and finishes the log before the script exits
wait
exit "$status"
