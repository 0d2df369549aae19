"""The default model's decoder matmuls alone (30 layers of q|k|v, o, gate|up, down: 120 products, 106 M weights), as
one ONNX graph per kind, by rows: the kernel library's BlockMatMul16 (`--int8-matmul rows16`: fp32 rows in, int16
per row inside), its BlockMatMul16Q4 (`--int4-matmul rows16`: 4-bit Q4_1 blocks), its BlockMatMulF32Q4
(`--fp32-matmul blocks`: fp32 rows times Q4_1 blocks rebuilt in fp32), ONNX Runtime's MatMulInteger (uint8 rows, int8
weights per column: the product inside `--int8-matmul rows`, without RowQuantize and ScaleRows) or its fp32 MatMul.
Best of 25 runs after 5, in ms.

    python scripts/block_matmul_micro.py --kind block --rows 1 8 64 [--threads 2] [--library PATH]
    python scripts/block_matmul_micro.py --kind block4 --rows 1 8 64
    python scripts/block_matmul_micro.py --kind integer --rows 1 8 64
    python scripts/block_matmul_micro.py --kind f32q4 --rows 1 8 64      # and --kind matmul (fp32 weights)

``--library``: a kernel library file to load instead of the one compiled from this checkout (to set two versions of
the kernel side by side; ``MEDUSA_EXPORT_KERNEL_AVX2=1`` takes the AVX2 path, ``MEDUSA_EXPORT_KERNEL_NO_AMX=1`` keeps
steps of 16 rows or more off the AMX tiles).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from medusa_export.exporter.quantize_rows import block_int4, block_int8
from medusa_export.runtime import kernels
from medusa_export.runtime.machine import machine_info
from script_io import run_main  # noqa: E402

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)] * 30
RUNS, WARMUP = 30, 5


def graph(kind: str):
    """The 120 products as independent nodes reading one input per K."""
    rng = np.random.default_rng(0)
    inits, nodes, outputs = [], [], []
    elem = TensorProto.UINT8 if kind == "integer" else TensorProto.FLOAT
    if kind == "integer":
        inits.append(helper.make_tensor("zero_point", TensorProto.UINT8, [], [128]))
    for i, (k, n) in enumerate(SHAPES):
        if kind == "block":
            packed, scale = block_int8(rng.standard_normal((k, n), dtype=np.float32))
            inits += [numpy_helper.from_array(packed, f"w{i}"), numpy_helper.from_array(scale, f"s{i}")]
            nodes.append(helper.make_node(kernels.BLOCK_OP, [f"x{k}", f"w{i}", f"s{i}"], [f"y{i}"],
                                          domain=kernels.DOMAIN))
        elif kind == "block4":  # Q4_1 levels 0..15 with random steps and minimums per block of 32
            q = rng.integers(0, 16, (n, k // 32, 32), dtype=np.uint8)
            step, low = rng.uniform(0.001, 0.01, (2, n, k // 32))
            arrays = block_int4(q, step, -8 * step + low)
            inits += [numpy_helper.from_array(a, f"{name}{i}") for name, a in zip("wso", arrays)]
            nodes.append(helper.make_node(kernels.BLOCK4_OP, [f"x{k}", f"w{i}", f"s{i}", f"o{i}"], [f"y{i}"],
                                          domain=kernels.DOMAIN))
        elif kind == "f32q4":  # two random levels a byte, fp16 steps and lows per block of 32 and column
            step, low = (rng.uniform(-0.01, 0.01, (n // 16, k // 32, 16)).astype(np.float16) for _ in range(2))
            arrays = (rng.integers(0, 256, (n // 16, k // 2, 16), dtype=np.uint8), step, low)
            inits += [numpy_helper.from_array(a, f"{name}{i}") for name, a in zip("wsl", arrays)]
            nodes.append(helper.make_node(kernels.BLOCK_F32_OP, [f"x{k}", f"w{i}", f"s{i}", f"l{i}"], [f"y{i}"],
                                          domain=kernels.DOMAIN))
        elif kind == "matmul":
            inits.append(numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), f"w{i}"))
            nodes.append(helper.make_node("MatMul", [f"x{k}", f"w{i}"], [f"y{i}"]))
        else:
            inits.append(numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), f"w{i}"))
            nodes.append(helper.make_node("MatMulInteger", [f"x{k}", f"w{i}", "zero_point"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(
            f"y{i}", TensorProto.INT32 if kind == "integer" else TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info(f"x{k}", elem, ["rows", k]) for k in (576, 1536)]
    return helper.make_model(helper.make_graph(nodes, kind, inputs, outputs, inits),
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(kernels.DOMAIN, 1)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=("block", "block4", "f32q4", "integer", "matmul"), required=True)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--library", default=None)
    args = ap.parse_args()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if args.library:
        opts.register_custom_ops_library(args.library)
    else:
        kernels.register(opts, "kernel")
    session = ort.InferenceSession(graph(args.kind).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    best = {}
    for rows in args.rows:
        if args.kind != "integer":
            feed = {f"x{k}": rng.standard_normal((rows, k), dtype=np.float32) for k in (576, 1536)}
        else:
            feed = {f"x{k}": rng.integers(0, 256, (rows, k), dtype=np.uint8) for k in (576, 1536)}
        times = []
        for _ in range(RUNS):
            t0 = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - t0)
        best[rows] = round(min(times[WARMUP:]) * 1e3, 2)
    print(json.dumps({"kind": args.kind, "threads": args.threads, "best_ms_by_rows": best,
                      "machine": machine_info()}))


if __name__ == "__main__":
    run_main(main)
