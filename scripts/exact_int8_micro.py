"""What ONNX Runtime's exact int8 products (``session.x64quantprecision``, `runtime/kernels.EXACT_INT8_PRODUCTS`) cost:
one row-quantized matmul (`exporter/quantize_rows.py`, 576 x 3,072 as a layer's gate | up) timed with and without
the entry, alternating, by rows; and whether the weights were rewritten to uint8 (ONNX Runtime does so wherever its
uint8 x int8 dispatch differs from uint8 x uint8, including CPUs with VNNI or AMX, which need no such help).

    python scripts/exact_int8_micro.py [--rows 1 8 64] [--json exact_int8_micro.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from medusa_export.exporter.quantize_rows import quantize_rows
from medusa_export.runtime import kernels
from medusa_export.runtime.machine import machine_info
from script_io import run_main, with_machine, writable, write_json  # noqa: E402

HIDDEN, WIDTH = 576, 3072


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=writable, default=None)
    args = ap.parse_args()
    w = np.random.default_rng(0).standard_normal((HIDDEN, WIDTH), dtype=np.float32) * 0.05
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], "mm")], "mm",
                              [helper.make_tensor_value_info("x", 1, [1, "S", HIDDEN])],
                              [helper.make_tensor_value_info("y", 1, [1, "S", WIDTH])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    quantize_rows(model, keep=lambda _name: False)
    sessions, uint8_weights = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for exact in (False, True):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            opts.log_severity_level = 3
            opts.register_custom_ops_library(kernels.library_path())
            if exact:
                opts.add_session_config_entry(*kernels.EXACT_INT8_PRODUCTS)
            opts.optimized_model_filepath = str(Path(tmp) / f"{exact}.onnx")
            sessions[exact] = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            optimized = onnx.load(opts.optimized_model_filepath, load_external_data=False)
            uint8_weights[exact] = any(i.data_type == onnx.TensorProto.UINT8 and len(i.dims) == 2
                                       for i in optimized.graph.initializer)
    out = []
    for rows in args.rows:
        x = np.random.default_rng(rows).standard_normal((1, rows, HIDDEN)).astype(np.float32)
        times = {False: [], True: []}
        for _ in range(3):  # alternating blocks
            for exact, session in sessions.items():
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    session.run(None, {"x": x})
                    times[exact].append(time.perf_counter() - t0)
        same = np.array_equal(sessions[False].run(None, {"x": x})[0], sessions[True].run(None, {"x": x})[0])
        row = {"rows": rows, "default_ms": round(float(np.median(times[False])) * 1e3, 4),
               "exact_ms": round(float(np.median(times[True])) * 1e3, 4), "same_output": bool(same)}
        print(json.dumps(row))
        out.append(row)
    result = {"machine": machine_info(), "clipping_cpu": kernels.clipping_int8_products(),
              "weights_rewritten_to_uint8": {"default": uint8_weights[False], "exact": uint8_weights[True]}, "rows": out}
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "rows")}))
    if args.json:
        write_json(args.json, with_machine(result), indent=1)


if __name__ == "__main__":
    run_main(main)
