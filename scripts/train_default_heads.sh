#!/usr/bin/env bash
# Reproduce exporter/shipped_heads/smollm2-135m-instruct: 4 shared-layout Medusa-1 heads for the default
# model (SmolLM2-135M-Instruct), self-distilled on train_prompts.jsonl (never on mt_bench.jsonl).
#
# Data: pass 1 = the model's greedy answers (up to 256 new tokens; also the held-out set), pass 2 = one
# sampled answer per prompt at T=0.7 (training only). Two processes share each pass's shard cache (a file
# lock per shard), one torch thread each: on the 2-core reference machine this beat one process with two
# threads. The training process generates its share, waits for the other's, then trains. Everything is
# resumable: rerun the script after an interruption. Measured on 2 shared cores: ~25 min per pass,
# ~12 min of training (1,600 positions/s, draft vocabulary 8192, bf16 projection); see training.json.
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
SEED=0
mkdir -p work-cache

# Helper process: the same passes (argv: data cache max_new batch temperature seed) as train_heads below.
( export MEDUSA_TRAIN_THREADS=1
  python -m medusa_export.exporter.training.data "$DATA" "$CACHE" "$MAX_NEW" "$GEN_BATCH" 0.0 "$SEED"
  python -m medusa_export.exporter.training.data "$DATA" "$CACHE" "$MAX_NEW" "$GEN_BATCH" 0.7 "$((SEED + 1))"
) > work-cache/gen_worker.log 2>&1 &

python -m medusa_export.exporter.training.cli_entry --data "$DATA" --out "$OUT" --cache-dir "$CACHE" \
    --max-new-tokens "$MAX_NEW" --gen-batch-size "$GEN_BATCH" --threads 1 \
    --extra-sampled-passes 1 --sample-temperature 0.7 \
    --num-heads 4 --num-layers 1 --seed "$SEED" --heldout-fraction 0.05 \
    --epochs 4 --lr 3e-3 --batch-size 256 --draft-vocab 8192 --amp auto "$@"
wait
