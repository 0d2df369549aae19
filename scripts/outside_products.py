"""What share of a one-token step runs outside the matrix products, timed without a profiler.

ONNX Runtime's profiler adds several microseconds to every node it times (a 600-node graph of one-row `Mul`s: about
8 µs of kernel time per node profiled against under 1 µs unprofiled), which inflates the many small nodes outside the
products. Here the artifact's vanilla graph runs a T = 1 step after ``--past`` random tokens, with the inputs of its
product nodes captured; then a graph of those product nodes alone (the same weights, the same operators, the captured
inputs) and the full step alternate in blocks, all through bound inputs and outputs (no Python in between). The
share outside is 1 - products / step, by p50.

Two sets of product nodes, each timed as its own graph:
- ``products``: ``MatMul``, ``MatMulNBits``, ``MatMulInteger``, ``Gemm``, the kernel library's products
  (``BlockMatMul16``, ``BlockMatMul16Q4``) and the screened lm_head (``ScreenedVocab``: its int8 screen and exact
  candidates), with the row quantization and scaling around ``MatMulInteger`` (``RowQuantize``, ``ScaleRows``: what
  ``MatMulNBits`` does inside itself);
- ``matmuls``: the same without ``RowQuantize`` and ``ScaleRows``.
What is left outside both: attention, norms, the activation function, the graph's slicing and the vocabulary
reduction of a traced tail.

    python scripts/outside_products.py ARTIFACT [ARTIFACT ...] [--past 256] [--blocks 10] [--steps 30] \\
        [--threads 2] [--json outside_products.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from medusa_export.runtime import kernels
from medusa_export.runtime.api import MedusaRuntime
from medusa_export.runtime.machine import machine_info

sys.path.insert(0, str(Path(__file__).resolve().parent))
from script_io import positive, run_main, writable, write_json  # noqa: E402

MATMULS = {"MatMul", "MatMulNBits", "MatMulInteger", "Gemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
           kernels.BLOCK_OP, kernels.BLOCK4_OP, kernels.BLOCK_F32_OP, kernels.SCREEN_OP}
FAMILIES = {"products": MATMULS | {kernels.QUANTIZE_OP, kernels.SCALE_OP}, "matmuls": MATMULS}
# Element types of the non-float outputs a family's boundary can cross (the rest are activations: float).
OUTPUT_TYPES = {kernels.QUANTIZE_OP: (onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT),
                "MatMulInteger": (onnx.TensorProto.INT32,)}
WARMUP = 5  # steps of each block not counted (the other graph's data still in the caches)


def boundary(graph, family: set[str]) -> tuple[list[str], list[str]]:
    """The ``family`` nodes' inputs made elsewhere (graph inputs or other nodes' outputs) and their outputs used
    elsewhere (by other nodes or as graph outputs), in graph order."""
    initializers = {i.name for i in graph.initializer}
    products = [n for n in graph.node if n.op_type in family]
    made_inside = {o for n in products for o in n.output}
    inputs = list(dict.fromkeys(i for n in products for i in n.input
                                if i and i not in initializers and i not in made_inside))
    used_outside = {i for n in graph.node if n.op_type not in family for i in n.input}
    used_outside |= {o.name for o in graph.output}
    outputs = [o for n in products for o in n.output if o in used_outside]
    return inputs, outputs


def output_infos(graph, names: list[str]) -> list:
    """Value infos for ``names`` as outputs: the graph's own where it declares them, else by their producer."""
    declared = {o.name: o for o in graph.output}
    kinds = {o: (OUTPUT_TYPES.get(n.op_type, ()) + (onnx.TensorProto.FLOAT,) * len(n.output))[i]
             for n in graph.node for i, o in enumerate(n.output)}
    return [declared.get(o) or helper.make_tensor_value_info(o, kinds.get(o, onnx.TensorProto.FLOAT), None)
            for o in names]


def family_model(model, family: set[str], inputs: list[str], outputs: list[str], values: dict[str, np.ndarray]):
    """A model of ``model``'s ``family`` nodes alone, fed by ``inputs`` (their captured ``values``: types, shapes)."""
    g = model.graph
    products = [n for n in g.node if n.op_type in family]
    used = {i for n in products for i in n.input}
    value = lambda name, a: helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
    out = helper.make_graph(products, "products", [value(k, values[k]) for k in inputs], output_infos(g, outputs),
                            initializer=[i for i in g.initializer if i.name in used])
    return helper.make_model(out, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def session(backend, model) -> ort.InferenceSession:
    """``model`` (a ModelProto, weights in it) under the options the artifact's own sessions have: their threads,
    optimization level and kernel library."""
    return ort.InferenceSession(model.SerializeToString(), backend.opts, providers=backend.providers)


def prefilled(backend, past: int, rng):
    """A backend session holding ``past`` random tokens, and a next token."""
    s = backend.new_session(past + 2)
    s.run(rng.integers(0, backend.dims.vocab_size, past), np.arange(past), np.tri(past, dtype=bool), False, 1.0)
    s.keep(np.arange(past))
    return s, rng.integers(0, backend.dims.vocab_size, 1)


def capture(backend, model, names: list[str], past: int) -> dict[str, np.ndarray]:
    """The values of ``names`` in a T = 1 step after ``past`` tokens: the graph run once with them as extra outputs
    (graph inputs and outputs among them: what the step was fed, what it returned)."""
    ends = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    extra = [n for n in names if n not in ends]
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    tapped.graph.output.extend(output_infos(model.graph, extra))
    original = backend.sessions.get("vanilla")
    backend.sessions["vanilla"] = session(backend, tapped)
    s, token = prefilled(backend, past, np.random.default_rng(0))
    binding = s._binding("vanilla")
    for n in extra:  # bound last: `get_outputs` keeps the order of first binding
        binding.bind_output(n, "cpu")
    s.run(token, np.array([past]), np.ones((1, 1), bool), False, 1.0)
    outputs = binding.get_outputs()
    values = dict(zip(s.reduced["vanilla"], outputs))  # bound first
    values.update(zip(extra, outputs[len(outputs) - len(extra):]))
    values = {n: np.array(v.numpy()) for n, v in values.items()}  # copies: a view dies with its OrtValue
    s.close()
    backend.sessions["vanilla"] = original
    values.update(input_ids=np.asarray(token, np.int64).reshape(1, 1), temperature=np.ones(1, np.float32))
    unknown = [n for n in names if n not in values]
    if unknown:
        raise SystemExit(f"the products take graph inputs this script does not feed: {unknown}")
    return {n: values[n] for n in names}


def measure(directory: Path, past: int, blocks: int, steps: int, threads: int) -> dict:
    rt = MedusaRuntime.load(directory, backend="ort", threads=threads)
    backend, attention = rt.generator.backend, rt.manifest.attention
    model = onnx.load(str(directory / rt.manifest.graphs["vanilla"].file))  # weights in memory: ONNX Runtime
    bounds = {k: boundary(model.graph, f) for k, f in FAMILIES.items()}     # takes external data only beside it
    backend.graph("vanilla")  # the artifact's own session, opened before `capture` swaps in its copy
    captured = capture(backend, model, list(dict.fromkeys(n for i, _ in bounds.values() for n in i)), past)
    s, token = prefilled(backend, past, np.random.default_rng(0))
    s.run(token, np.array([past]), np.ones((1, 1), bool), False, 1.0)  # binds the step's inputs and outputs
    runs = {"step": lambda g=s.graphs["vanilla"], b=s._binding("vanilla"): g.run_with_iobinding(b)}
    for kind, family in FAMILIES.items():
        inputs, outputs = bounds[kind]
        g = session(backend, family_model(model, family, inputs, outputs, captured))
        b = g.io_binding()
        for n in inputs:
            b.bind_cpu_input(n, captured[n])
        for o in outputs:
            b.bind_output(o, "cpu")
        runs[kind] = lambda g=g, b=b: g.run_with_iobinding(b)
    times = {k: [] for k in runs}
    order = list(runs)
    for block in range(blocks):  # the same rows rewritten each step: the cache stays at ``past``
        for kind in order if block % 2 == 0 else order[::-1]:
            for i in range(steps + WARMUP):
                t0 = time.perf_counter()
                runs[kind]()
                if i >= WARMUP:
                    times[kind].append(time.perf_counter() - t0)
    s.close()
    rt.close()
    p50 = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    return {"weights": rt.manifest.weights, "attention": attention, "past": past, "nodes": len(model.graph.node),
            "p50_ms": {k: round(v, 2) for k, v in p50.items()},
            "outside_share": {k: round(1 - p50[k] / p50["step"], 3) for k in FAMILIES}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--past", type=positive, default=256)
    ap.add_argument("--blocks", type=positive, default=10)
    ap.add_argument("--steps", type=positive, default=30)
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--json", type=writable)
    args = ap.parse_args()
    rows = {}
    for d in args.artifacts:
        rows[str(d)] = measure(d, args.past, args.blocks, args.steps, args.threads)
        print(d, json.dumps(rows[str(d)]))
    if args.json:
        write_json(args.json, {"machine": machine_info(), "rows": rows}, indent=1)


if __name__ == "__main__":
    run_main(main)
