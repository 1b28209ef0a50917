#!/usr/bin/env bash
# The GPU measurements of issue 9 in one call of at most 8 minutes (bench/gpu.py says what each step measures):
#   bench/gpu.sh              on a machine with a CUDA GPU: writes bench/results/gpu.{json,md}
#   bench/gpu.sh --dry-run    every step for 2 steps on the CPU with a tiny model (tests/test_speed_startup.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1
exec timeout --signal=TERM "${GPU_BENCH_TIMEOUT_S:-470}" "$PY" bench/gpu.py "$@"
