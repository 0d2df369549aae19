#!/usr/bin/env bash
# The test suite in its own fresh environment (CPU only; GPU / TensorRT tests skip with their reason).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
export HF_HUB_OFFLINE=1
venv=${VENV:-.venv-test}
bash scripts/setup_env.sh "$venv"
. "$venv/bin/activate"
python -m pytest -q -p no:cacheprovider "$@"
