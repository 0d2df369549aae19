#!/usr/bin/env bash
# GPU check in one command: build the default model's artifact with TensorRT engines, verify TensorRT against
# ONNX Runtime, benchmark both, run the PyTorch-on-CUDA check (scripts/torch_cuda_check.py), optionally train the
# default heads on the GPU, and keep every result as JSON in one directory. Without TensorRT (a PyTorch-only GPU
# image) the TensorRT steps are skipped with the reason and the PyTorch steps still run.
#
# Written against: TensorRT 10.x Python API (10.3 or newer; strongly typed networks, execute_async_v3,
# name-based tensor I/O) and TensorRT 11.x (strong typing only, no BuilderFlag.FP16); CUDA 12.x or 13.x
# runtime through cuda-python (`cuda.bindings.runtime`, cuda-python >= 12.6); Python 3.11; an NVIDIA GPU
# with compute capability 7.5 or newer (what TensorRT 10 supports).
#
# Usage (repository root, in an environment where `pip install -e '.[all,tensorrt]'` has been run):
#     scripts/gpu_check.sh [RESULTS_DIR]                  # default results/gpu-<date>
# Environment knobs: ARTIFACT (artifacts/gpu), DTYPE (fp32 | fp16), LIMIT (8 prompts), MAX_NEW_TOKENS (128),
#     PROMPTS (a JSONL; default: the packaged prompt set), SKIP_BUILD=1 (reuse ARTIFACT), TORCH_CHECK=0|1 (run
#     scripts/torch_cuda_check.py; default: when PyTorch sees a CUDA device), PYTEST=0 (skip the GPU tests),
#     TRAIN_HEADS=1 (also distil and train the default heads on CUDA with scripts/train_default_heads.sh into
#     RESULTS_DIR/heads; EPOCHS, default 1).
# Exit code: 0 when every step that ran passed, 1 when a check failed (see summary.json), 2 when neither TensorRT
# nor a CUDA device for PyTorch is there.
set -uo pipefail
export HF_HUB_OFFLINE=1   # every model comes from the local cache: never the network

results=${1:-results/gpu-$(date +%Y%m%d-%H%M%S)}
art=${ARTIFACT:-artifacts/gpu}
dtype=${DTYPE:-fp32}
limit=${LIMIT:-8}
new_tokens=${MAX_NEW_TOKENS:-128}
prompts=${PROMPTS:-}   # empty: the packaged prompt set
mkdir -p "$results"

# 1. Prerequisites and versions. TensorRT missing: its steps are skipped; no CUDA for PyTorch either: exit 2.
python - "$results/environment.json" <<'EOF'
import importlib.metadata as md, importlib.util, json, platform, sys
from medusa_export.runtime.backends import trt_availability as availability
status = availability.check()
def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None
torch_cuda = None
if importlib.util.find_spec("torch") is not None:
    import torch
    torch_cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else None
env = {"python": platform.python_version(), "ok": status.ok, "reason": status.reason,
       "tensorrt": status.tensorrt_version, "cuda_runtime": status.cuda_runtime,
       "gpu": status.device.name if status.device else torch_cuda,
       "compute_capability": status.device.compute_capability if status.device else None,
       "torch_cuda_device": torch_cuda,
       "packages": {d: version(d) for d in ("medusa-export", "tensorrt", "cuda-python", "cuda-bindings",
                                            "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "transformers", "polygraphy")}}
try:
    from medusa_export.runtime.backends.cuda_buffers import load_cuda
    env["cuda_driver"] = load_cuda().driver_version()
except Exception as e:
    env["cuda_driver"] = f"unknown ({e})"
open(sys.argv[1], "w").write(json.dumps(env, indent=2) + "\n")
print(json.dumps(env))
if not status.ok and torch_cuda is None:
    print(f"error: {status.reason}; and PyTorch sees no CUDA device: run this on a GPU machine", file=sys.stderr)
    sys.exit(2)
if not status.ok:
    print(f"skipping the TensorRT steps: {status.reason}", file=sys.stderr)
    sys.exit(3)
EOF
case $? in
    0) trt=1 ;;
    3) trt=0 ;;
    *) exit 2 ;;
esac
# The PyTorch check runs by default where PyTorch sees a CUDA device (a TensorRT image may have none).
torch_cuda=$(python -c 'import json, sys; print(int(bool(json.load(open(sys.argv[1]))["torch_cuda_device"])))' \
    "$results/environment.json")

declare -A rc
step() {  # step NAME LOGFILE COMMAND...: run, tee the log, remember the exit code
    local name=$1 log=$2
    shift 2
    echo "== $name: $*"
    "$@" 2>&1 | tee "$results/$log"
    rc[$name]=${PIPESTATUS[0]}
    echo "== $name: exit ${rc[$name]}"
}

if [[ $trt == 1 ]]; then
    # 2. Build: ONNX export + validation, then the TensorRT engines (recorded in the manifest).
    if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
        step build build.log medusa-export build --out "$art" --engine trt --dtype "$dtype"
    fi
    python - "$art" "$results/engines.json" <<'EOF'
import json, sys
m = json.load(open(f"{sys.argv[1]}/manifest.json"))
json.dump({"dtype": m["dtype"], "max_seq": m["max_seq"], "tree": m["tree"]["name"], "engines": m.get("engines", {})},
          open(sys.argv[2], "w"), indent=2)
EOF

    # 3. Verify: identical greedy tokens (vanilla and Medusa), top-1 agreement, probability error vs ONNX Runtime.
    step verify verify.log medusa-export verify "$art" --backends ort,trt ${prompts:+--prompts "$prompts"} \
        --limit "$limit" --max-new-tokens 64 --json "$results/verify.json"

    # 4. Bench: tokens/s, accepted tokens per step, step latency, for ONNX Runtime and TensorRT.
    step bench bench.log medusa-export bench "$art" --backends ort,trt ${prompts:+--prompts "$prompts"} \
        --limit "$limit" --max-new-tokens "$new_tokens" --no-hf --json "$results/bench.json"
    step bench_c8 bench_c8.log medusa-export bench "$art" --backends trt ${prompts:+--prompts "$prompts"} \
        --limit "$limit" --max-new-tokens "$new_tokens" --no-hf --concurrency 8 --json "$results/bench_concurrency8.json"

    # 5. The tests that need TensorRT and a GPU (skipped elsewhere), plus the rest of the engine tests.
    if [[ "${PYTEST:-1}" != 0 ]]; then
        step pytest pytest.log python -m pytest -q -rs tests/test_engines.py tests/test_trt_backend.py tests/test_trt_lanes.py
    fi
fi

# 6. The PyTorch-on-CUDA reference check: Medusa vs vanilla on the PyTorch backend, greedy equality and step latency.
if [[ "${TORCH_CHECK:-$torch_cuda}" == 1 ]]; then
    step torch_cuda torch_cuda.log python scripts/torch_cuda_check.py ${prompts:+--prompts "$prompts"} --limit "$limit" \
        --max-new-tokens "$new_tokens" --out "$results/torch_cuda.json"
fi

# 7. Optional: the default heads' recipe on CUDA (distillation and training; the cache stays in work-cache/).
if [[ "${TRAIN_HEADS:-0}" == 1 ]]; then
    step train_heads train_heads.log env OUT="$results/heads" bash scripts/train_default_heads.sh --device cuda \
        --gen-batch-size 384 --threads 8 --epochs "${EPOCHS:-1}" --no-progress
fi

# Summary.
status=0
summary="{\"tensorrt\": $([[ $trt == 1 ]] && echo true || echo false), "
for name in "${!rc[@]}"; do
    summary+="\"$name\": ${rc[$name]}, "
    [[ ${rc[$name]} == 0 ]] || status=1
done
summary+="\"ok\": $([[ $status == 0 ]] && echo true || echo false)}"
echo "$summary" | python -m json.tool > "$results/summary.json"
cat "$results/summary.json"
echo "results in $results"
exit $status
