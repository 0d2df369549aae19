"""The attention kernel's cost by KV cache type: one LanesAttention (or LanesAttention16) call of the default model's
shape (9 query heads, 3 KV heads, head size 64), one new row per lane, at several pasts and lane counts, 30 caches
used in turn (one per layer, so they are not all hot in the CPU's caches; ``--caches 400`` puts them beyond a large
L3, as a real step's weights push them out).

    python scripts/kernel_kv_micro.py [--pasts 256 1000 2000] [--lanes 1 8] [--repeats 5] [--caches 30] [--json out.json]

Prints µs per call (median of the repeats' means) for fp32 and fp16 caches, side by side, and the machine's flags.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from medusa_export.runtime import kernels
from medusa_export.runtime.machine import machine_info
from script_io import run_main, with_machine, writable, write_json  # noqa: E402

HEADS, KV_HEADS, HD, LAYERS = 9, 3, 64, 30
WIDTH = (HEADS + 2 * KV_HEADS) * HD


def session(lanes: int, half: bool, threads: int) -> ort.InferenceSession:
    f, kv = TensorProto.FLOAT, TensorProto.FLOAT16 if half else TensorProto.FLOAT
    cache = [1, KV_HEADS, "capacity", HD]
    inputs = [helper.make_tensor_value_info("qkv", f, [1, "R", WIDTH]),
              helper.make_tensor_value_info("lane_sizes", TensorProto.INT64, ["L"]),
              helper.make_tensor_value_info("cos", f, ["P", HD // 2]), helper.make_tensor_value_info("sin", f, ["P", HD // 2])]
    outputs = [helper.make_tensor_value_info("out", f, [1, "R", HEADS * HD])]
    for b in range(lanes):
        inputs += [helper.make_tensor_value_info(f"position_ids.{b}", TensorProto.INT64, [1, 2]),
                   helper.make_tensor_value_info(f"bias.{b}", f, [1, 1, 2, f"T{b}"]),
                   helper.make_tensor_value_info(f"past_key.{b}", kv, cache),
                   helper.make_tensor_value_info(f"past_value.{b}", kv, cache)]
        outputs += [helper.make_tensor_value_info(f"present_{k}.{b}", kv, cache) for k in ("key", "value")]
    node = helper.make_node(kernels.lanes_op(half), [i.name for i in inputs], [o.name for o in outputs],
                            domain=kernels.DOMAIN, num_heads=HEADS, kv_num_heads=KV_HEADS)
    model = helper.make_model(helper.make_graph([node], "lanes", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(kernels.DOMAIN, 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    kernels.register(opts, "kernel")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def measure(past: int, lanes: int, half: bool, threads: int, repeats: int, layers: int = LAYERS) -> float:
    """µs per call: the median over ``repeats`` of the mean over max(60, ``layers``) calls, cycling through ``layers``
    caches."""
    calls = max(60, layers)
    rng = np.random.default_rng(0)
    dtype, cap = np.float16 if half else np.float32, past + 16
    s = session(lanes, half, threads)
    caches = [[rng.standard_normal((2, 1, KV_HEADS, cap, HD)).astype(dtype) for _ in range(lanes)] for _ in range(layers)]
    cos, sin = (np.cos(np.arange(cap)[:, None] * 0.01 * np.arange(1, HD // 2 + 1)).astype(np.float32),
                np.sin(np.arange(cap)[:, None] * 0.01 * np.arange(1, HD // 2 + 1)).astype(np.float32))
    bindings = []
    for layer in caches:
        b = s.io_binding()
        for name, value in {"qkv": rng.standard_normal((1, lanes, WIDTH)).astype(np.float32),
                            "lane_sizes": np.full(lanes, 2, np.int64), "cos": cos, "sin": sin}.items():
            b.bind_cpu_input(name, value)
        b.bind_output("out", "cpu")
        for lane, kv in enumerate(layer):
            b.bind_cpu_input(f"position_ids.{lane}", np.array([[past, past]], np.int64))
            b.bind_cpu_input(f"bias.{lane}", np.zeros((1, 1, 2, past + 2), np.float32))
            for i, kind in enumerate(("key", "value")):
                buf = kv[i]
                b.bind_input(f"past_{kind}.{lane}", "cpu", 0, dtype, list(buf.shape), buf.ctypes.data)
                b.bind_output(f"present_{kind}.{lane}", "cpu", 0, dtype, list(buf.shape), buf.ctypes.data)
        bindings.append(b)
    for b in bindings:  # warm up
        s.run_with_iobinding(b)
    means = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(calls):
            s.run_with_iobinding(bindings[i % layers])
        means.append((time.perf_counter() - t0) / calls * 1e6)
    return float(np.median(means))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pasts", type=int, nargs="+", default=[256, 1000, 2000])
    ap.add_argument("--lanes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--caches", type=int, default=LAYERS, help="caches used in turn, one per call")
    ap.add_argument("--json", type=writable, default=None)
    args = ap.parse_args(argv)
    rows = []
    for lanes in args.lanes:
        for past in args.pasts:
            fp32, fp16 = (measure(past, lanes, half, args.threads, args.repeats, args.caches) for half in (False, True))
            rows.append({"lanes": lanes, "past": past, "fp32_us": round(fp32, 1), "fp16_us": round(fp16, 1),
                         "fp16_over_fp32": round(fp16 / fp32, 3)})
            print(json.dumps(rows[-1]), flush=True)
    out = {"machine": machine_info(), "threads": args.threads, "repeats": args.repeats, "caches": args.caches,
           "rows": rows}
    if args.json:
        write_json(args.json, with_machine(out), indent=1)
    return 0


if __name__ == "__main__":
    run_main(main)
