#!/usr/bin/env bash
# The main job on the built-in default model: set up, build the artifact (ONNX, trained heads, calibrated
# tree), generate with Medusa, and show the speed-up over vanilla decoding. Needs nothing beside the clone:
# the bench uses the packaged prompt set unless PROMPTS names a JSONL file (e.g. MT-Bench's question.jsonl).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
export HF_HUB_OFFLINE=1
venv=${VENV:-.venv-demo}
bash scripts/setup_env.sh "$venv"
. "$venv/bin/activate"
out=${ARTIFACT:-artifacts/smollm2}
medusa-export build --out "$out"
medusa-export generate "$out" --prompt "Give me three tips for writing clear technical documentation." --max-new-tokens 96
medusa-export bench "$out" ${PROMPTS:+--prompts "$PROMPTS"} --limit "${BENCH_PROMPTS:-8}" --max-new-tokens 128 \
  --json "$(dirname "$out")/bench.json" --plot "$(dirname "$out")/bench.png"   # beside the artifact, not in it
