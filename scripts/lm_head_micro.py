"""One lm_head-sized product by rows: fp32 (ONNX Runtime's MatMul) and int8 two ways, ``MatMulNBits`` (8-bit blocks
of 32, accuracy level 4, the int8 recipe's) and the per-row form of `exporter/quantize_rows.py` (RowQuantize,
MatMulInteger, ScaleRows; the input turned per block of 64, as the int8 rows recipe's lm_head). Random weights of the default model's shape;
64 MB are touched before every call so the weights come from memory, as in a decoding step.

    python scripts/lm_head_micro.py [--rows 1 8 16] [--calls 25] [--threads 2] [--json lm_head_micro.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np
import onnxruntime as ort
from onnx import helper, numpy_helper

from medusa_export.exporter.quantize_rows import quantize_rows
from medusa_export.runtime import kernels
from medusa_export.runtime.machine import machine_info
from script_io import run_main, writable, write_json  # noqa: E402

HIDDEN, VOCAB = 576, 49152


def _model(w: np.ndarray):
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], "lm_head")], "lm_head",
                              [helper.make_tensor_value_info("x", 1, [1, "S", HIDDEN])],
                              [helper.make_tensor_value_info("y", 1, [1, "S", VOCAB])], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--calls", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=writable, default=None)
    args = ap.parse_args()
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    w = np.random.default_rng(0).standard_normal((HIDDEN, VOCAB), dtype=np.float32) * 0.05
    blocks = MatMulNBitsQuantizer(_model(w), bits=8, block_size=32, is_symmetric=True, accuracy_level=4)
    blocks.process()
    rows_model = _model(w)
    quantize_rows(rows_model, keep=lambda _name: False, turn=lambda _name: True, turn_block=64)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    kernels.register(opts, "kernel")
    sessions = {kind: ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
                for kind, m in (("fp32", _model(w)), ("blocks", blocks.model.model), ("rows_turned", rows_model))}
    junk = np.ones(64 * 1024 * 1024 // 4, np.float32)
    out = []
    for rows in args.rows:
        x = np.random.default_rng(rows).standard_normal((1, rows, HIDDEN), dtype=np.float32)
        row = {"rows": rows}
        for kind, session in sessions.items():
            times = []
            for _ in range(args.calls + 5):
                junk += 1
                t0 = time.perf_counter()
                session.run(None, {"x": x})
                times.append(time.perf_counter() - t0)
            row[f"{kind}_ms"] = round(float(np.median(times[5:])) * 1e3, 3)
        print(json.dumps(row))
        out.append(row)
    if args.json:
        write_json(args.json, {"machine": machine_info(), "args": vars(args), "rows": out}, indent=1)


if __name__ == "__main__":
    run_main(main)
