#!/usr/bin/env bash
# The test suite in its own fresh environment (CPU only; GPU / TensorRT tests skip with their reason).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
export HF_HUB_OFFLINE=1
venv=${VENV:-.venv-test}
bash scripts/setup_env.sh "$venv"
. "$venv/bin/activate"
# One worker per core, at most 4 (each worker builds its own session fixtures and may hold the real model);
# --dist loadfile keeps a file's tests, and its module fixtures, on one worker; --no-loadscope-reorder keeps the
# collection order, which puts the longest file first (tests/conftest.py). PYTEST_WORKERS=0 runs serially.
workers=${PYTEST_WORKERS:-$(python -c 'import os
cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
print(min(4, cpus))')}
if [ "$workers" -gt 1 ]; then
    python -m pytest -q -p no:cacheprovider -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
else
    python -m pytest -q -p no:cacheprovider "$@"
fi
