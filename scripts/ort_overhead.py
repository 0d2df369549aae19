"""Runtime overhead of the ONNX Runtime backend: a vanilla decode step through the runtime vs a bare
`InferenceSession.run` on the same inputs (same graph, same past length).

    python scripts/ort_overhead.py artifacts/smollm2 [--past 256] [--steps 60] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from medusa_export.runtime import io_table
from medusa_export.runtime.api import MedusaRuntime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--past", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    rt = MedusaRuntime.load(args.artifact, backend="ort", threads=args.threads)
    backend = rt.generator.backend
    dims, n = backend.dims, backend.dims.num_layers
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, dims.vocab_size, args.past)

    # Through the runtime: prefill, then T=1 steps that each commit their row (as decoding does).
    s = backend.new_session()
    s.run(prompt, np.arange(args.past), np.tri(args.past, dtype=bool), False, 1.0)
    s.keep(np.arange(args.past))
    runtime_ms = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        out = s.run(np.array([int(prompt[i])]), np.array([s.length]), np.ones((1, 1), bool), False, 1.0)
        s.keep(np.zeros(1, np.int64))
        _ = out.next_ids[0, 0]
        runtime_ms.append((time.perf_counter() - t0) * 1e3)

    # Bare session.run with plain numpy inputs of the same shapes, past fixed at the same length.
    sess = backend.sessions["vanilla"]
    past = args.past + args.steps // 2
    feed = {"input_ids": np.array([[1]], np.int64), "position_ids": np.array([[past]], np.int64),
            "attention_mask": np.ones((1, 1, 1, past + 1), bool), "temperature": np.ones(1, np.float32)}
    if backend.selects_rows.get("vanilla"):  # graphs that compute outputs only for the rows asked
        feed["output_rows"] = np.zeros(1, np.int64)
    head_major = backend.kv_layout == io_table.HEAD_MAJOR_SHARED  # then a past of exactly `past` rows, unshared
    shape = (1, dims.num_kv_heads, past, dims.head_dim) if head_major else (1, past, dims.num_kv_heads, dims.head_dim)
    for name in io_table.kv_names(n, "past_key_values"):
        feed[name] = rng.standard_normal(shape).astype(np.float32) * 0.1
    bare_ms = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        sess.run(None, feed)
        bare_ms.append((time.perf_counter() - t0) * 1e3)
    r, b = float(np.median(runtime_ms)), float(np.median(bare_ms))
    print(json.dumps({"past": args.past, "steps": args.steps, "runtime_step_ms_p50": round(r, 2),
                      "bare_session_run_ms_p50": round(b, 2), "overhead_pct": round(100 * (r - b) / b, 1)}))


if __name__ == "__main__":
    main()
