"""One GroupQueryAttention node of the default model's shape (9 query heads, 3 KV heads, head size 64) on ONNX
Runtime's CPU provider: microseconds per call by KV dtype (fp32 / fp16), new rows (1 / 2) and past length, each
call on the next of 120 shared-buffer caches in turn (the caches are not hot, as in a step of several sequences x 30
layers). The configurations are measured in turn, ``--repeats`` times; the median per configuration.

    python scripts/attention_micro.py [--threads 2] [--repeats 5] [--json attention_micro.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from medusa_export.runtime.machine import machine_info
from script_io import run_main, with_machine, writable, write_json  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, CAPACITY = 9, 3, 64, 2048


def gqa_model(elem: int) -> bytes:
    np_dtype = np.float16 if elem == TensorProto.FLOAT16 else np.float32
    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    kv = [1, KV_HEADS, CAPACITY, HEAD_DIM]
    inputs = [helper.make_tensor_value_info("qkv", elem, [1, "S", width]),
              helper.make_tensor_value_info("past_key", elem, kv), helper.make_tensor_value_info("past_value", elem, kv),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total", TensorProto.INT32, []),
              helper.make_tensor_value_info("positions", TensorProto.INT64, [1, "S"])]
    angles = np.arange(CAPACITY * HEAD_DIM // 2).reshape(CAPACITY, HEAD_DIM // 2) * 1e-3
    caches = [helper.make_tensor(name, elem, list(angles.shape), fn(angles).astype(np_dtype).tobytes(), raw=True)
              for name, fn in (("cos", np.cos), ("sin", np.sin))]
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total",
                                                    "cos", "sin", "positions"], ["out", "present_key", "present_value"],
                            domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS, do_rotary=1)
    outputs = [helper.make_tensor_value_info("out", elem, [1, "S", HEADS * HEAD_DIM]),
               helper.make_tensor_value_info("present_key", elem, kv),
               helper.make_tensor_value_info("present_value", elem, kv)]
    graph = helper.make_graph([node], "gqa", inputs, outputs, caches)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def prepared(elem: int, rows: int, past: int, threads: int, caches: int = 120):
    """A session and ``caches`` bindings, each on its own KV buffers."""
    np_dtype = np.float16 if elem == TensorProto.FLOAT16 else np.float32
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(gqa_model(elem), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    bindings = []
    for _ in range(caches):
        kv = [ort.OrtValue.ortvalue_from_numpy(rng.random((1, KV_HEADS, CAPACITY, HEAD_DIM)).astype(np_dtype))
              for _ in range(2)]
        b = session.io_binding()
        b.bind_cpu_input("qkv", rng.random((1, rows, (HEADS + 2 * KV_HEADS) * HEAD_DIM)).astype(np_dtype))
        b.bind_ortvalue_input("past_key", kv[0])
        b.bind_ortvalue_input("past_value", kv[1])
        b.bind_ortvalue_output("present_key", kv[0])  # shared buffers: the new rows are written in place
        b.bind_ortvalue_output("present_value", kv[1])
        b.bind_cpu_input("seqlens_k", np.array([past + rows - 1], np.int32))
        b.bind_cpu_input("total", np.array(past + rows, np.int32))
        b.bind_cpu_input("positions", np.arange(past, past + rows, dtype=np.int64)[None])
        b.bind_output("out")
        bindings.append((b, kv))
    for b, _ in bindings:
        session.run_with_iobinding(b)
    return session, bindings


def us_per_call(session, bindings, rounds: int = 10) -> float:
    t0 = time.perf_counter()
    for _ in range(rounds):
        for b, _ in bindings:
            session.run_with_iobinding(b)
    return (time.perf_counter() - t0) / (rounds * len(bindings)) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=writable, default=None)
    args = ap.parse_args()
    configs = [(past, kv_dtype, elem, new_rows) for past in (300, 1000)
               for kv_dtype, elem in (("fp32", TensorProto.FLOAT), ("fp16", TensorProto.FLOAT16)) for new_rows in (1, 2)]
    runs = [prepared(elem, new_rows, past, args.threads) for past, _, elem, new_rows in configs]
    times: list[list[float]] = [[] for _ in configs]
    for _ in range(args.repeats):
        for i, (session, bindings) in enumerate(runs):
            times[i].append(us_per_call(session, bindings))
    rows = [{"past": past, "kv_dtype": kv_dtype, "new_rows": new_rows, "us_per_call_p50": round(float(np.median(t)), 1),
             "us_per_call_min": round(min(t), 1), "us_per_call_max": round(max(t), 1)}
            for (past, kv_dtype, _, new_rows), t in zip(configs, times)]
    for row in rows:
        print(json.dumps(row))
    report = {"threads": args.threads, "repeats": args.repeats, "rows": rows, "onnxruntime": ort.__version__,
              "machine": machine_info()}
    if args.json:
        write_json(args.json, with_machine(report), indent=1)


if __name__ == "__main__":
    run_main(main)
