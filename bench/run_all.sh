#!/usr/bin/env bash
# Run every benchmark and rewrite its table in docs/benchmarks.md; prints how long it took.
#   bash bench/run_all.sh                 # CPU, full repetitions
#   bash bench/run_all.sh --quick         # smoke run: fewer repetitions, prints only
#   bash bench/run_all.sh --device cuda   # on a GPU
# Arguments are passed to every script; PYTHON picks the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
start=$SECONDS
for script in step_time max_batch feature_cache data_overhead startup serving; do
    echo "=== bench/$script.py $* ($(date +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    "$PYTHON" "bench/$script.py" "$@"
done
echo "=== done in $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s" >&2
