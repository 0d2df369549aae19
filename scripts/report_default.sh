#!/usr/bin/env bash
# Reproduce the figures of docs/results.md on the default model (2-core CPU, ONNX Runtime): calibrate the tree for the
# shipped heads, build the artifact (fused fp32 graphs), benchmark on MT-Bench; then the portable graphs and the
# int8 / int4 artifacts side by side, step latency by tree size and past, streaming cost.
# Usage: MT_BENCH=question.jsonl scripts/report_default.sh [RESULTS_DIR]   (inside an environment from scripts/setup_env.sh;
#        MT_BENCH: FastChat's MT-Bench questions, see docs/results.md)
#        HEADS_ONLY=1 scripts/report_default.sh ...  stops after step 3 (what new heads change)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
res=${1:-scripts/results/default_cpu}
mkdir -p "$res"
mt=${MT_BENCH:?set MT_BENCH to the MT-Bench question.jsonl (see docs/results.md)}
heads=exporter/shipped_heads/smollm2-135m-instruct
# 1. Calibrate with a provisional artifact, then build with the result. Calibration prompts: the training
#    set's held-out prompts (never MT-Bench; prompts the heads trained on overstate their accuracy).
medusa-export build --out artifacts/calib --tree chain-4
medusa-export calibrate-tree artifacts/calib --data "$heads/heldout_prompts.jsonl" --out "$heads/tree.json" \
  --node-budget "${NODE_BUDGET:-40}"
rm -rf artifacts/calib
medusa-export build --out artifacts/smollm2            # picks up $heads/tree.json
# 2. Main run: all MT-Bench first turns, 128 new tokens, greedy, vanilla vs Medusa + transformers generate.
medusa-export bench artifacts/smollm2 --prompts "$mt" --max-new-tokens 128 --json "$res/bench_calibrated.json" \
  --plot "$res/bench_calibrated.png"
python scripts/head_accuracy.py artifacts/smollm2 --prompts "$mt" --max-new-tokens 128 --json "$res/head_accuracy.json"
# 3. Other trees: chain-4 on the same artifact; the GPU-sized mc_sim_7b_63 (42 paths) on the portable graphs
#    (masked tree step: a fused graph verifies only as many paths as its own tree has).
medusa-export build --out artifacts/smollm2-portable --graph portable
medusa-export bench artifacts/smollm2 --prompts "$mt" --limit "${TREE_PROMPTS:-20}" --max-new-tokens 128 \
  --tree chain-4 --no-hf --json "$res/bench_chain-4.json"
medusa-export bench artifacts/smollm2-portable --prompts "$mt" --limit "${TREE_PROMPTS:-20}" --max-new-tokens 128 \
  --tree mc_sim_7b_63 --no-hf --json "$res/bench_mc_sim_7b_63.json"
[ -n "${HEADS_ONLY:-}" ] && exit 0
python scripts/ort_overhead.py artifacts/smollm2 > "$res/ort_overhead.json"
# 4. Quantized weights (fused graphs), each with a tree calibrated on its own step costs, then speed, identical,
#    quality side by side with the portable and fp32 graphs.
for d in int8 int4; do
  medusa-export build --out "artifacts/calib-$d" --dtype "$d" --tree chain-4
  medusa-export calibrate-tree "artifacts/calib-$d" --data "$heads/heldout_prompts.jsonl" --out "$heads/tree_$d.json" \
    --node-budget "${NODE_BUDGET:-40}"
  rm -rf "artifacts/calib-$d"
  medusa-export build --out "artifacts/smollm2-$d" --dtype "$d" --quality-prompts "$mt"   # picks up tree_$d.json
done
for a in portable int8 int4; do
  medusa-export bench "artifacts/smollm2-$a" --prompts "$mt" --limit "${TREE_PROMPTS:-20}" --max-new-tokens 128 \
    --no-hf --json "$res/bench_$a.json"
done
python scripts/step_latency.py artifacts/smollm2-portable artifacts/smollm2 artifacts/smollm2-int8 \
  artifacts/smollm2-int4 --json "$res/step_latency.json"
python scripts/bench_streaming.py artifacts/smollm2 --json "$res/streaming.json"
