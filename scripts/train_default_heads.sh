#!/usr/bin/env bash
# Reproduce exporter/shipped_heads/smollm2-135m-instruct: 4 shared-layout Medusa-1 heads for the default
# model (SmolLM2-135M-Instruct), self-distilled on data/train_prompts.jsonl (never on mt_bench.jsonl).
#
# Two processes share the self-distillation cache (file locks per shard), one torch thread each: on the
# 2-core reference machine this beat one process with two threads. The training process generates its
# share of the shards, waits for the other's, then trains. Both are resumable: rerun after an interruption.
# Measured: ~80-85 generated tokens/s per process; ~40 min of wall clock all together (see training.json).
#
# Usage: scripts/train_default_heads.sh [extra train-heads options]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
DATA=${DATA:-/work/shared/data/train_prompts.jsonl}
CACHE=${CACHE:-work-cache/distill}
OUT=${OUT:-exporter/shipped_heads/smollm2-135m-instruct}
MAX_NEW=256
GEN_BATCH=64
mkdir -p work-cache

MEDUSA_TRAIN_THREADS=1 python -m medusa_export.exporter.training.data "$DATA" "$CACHE" "$MAX_NEW" "$GEN_BATCH" \
    > work-cache/gen_worker.log 2>&1 &
python -m medusa_export.exporter.training.cli_entry --data "$DATA" --out "$OUT" --cache-dir "$CACHE" \
    --max-new-tokens "$MAX_NEW" --gen-batch-size "$GEN_BATCH" --threads 1 \
    --num-heads 4 --num-layers 1 --layout shared --seed 0 --heldout-fraction 0.05 \
    --epochs 6 --lr 3e-3 --batch-size 256 --draft-vocab 8192 --amp auto "$@"
wait
