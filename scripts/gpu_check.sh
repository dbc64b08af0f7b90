#!/usr/bin/env bash
# The prepared GPU check (issue 12): one NVIDIA GPU, under 8 minutes. See scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" scripts/gpu_check.py "$@"
