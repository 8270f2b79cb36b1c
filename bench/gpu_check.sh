#!/usr/bin/env bash
# The GPU check on one CUDA GPU, stopped after 8 minutes (exit 124): bash bench/gpu_check.sh [--quick]
# Arguments go to bench/gpu_check.py; PYTHON picks the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 480 "$PYTHON" bench/gpu_check.py --device cuda "$@"
