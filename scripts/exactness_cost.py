"""What a one-token step pays for exactness and for the int8 input rotation: the artifact's vanilla graph next to
timing-only variants of it, in one process, interleaved; median milliseconds per step at each past length.

    python scripts/exactness_cost.py artifacts/smollm2-int8 [--past 200 1800] [--steps 120] [--repeats 5]
        [--threads 2] [--json exactness_cost.json]

Variants (`without_extra_row`, `without_rotation`; both where the graph has both):

* without the extra query row: every layer's GroupQueryAttention gets the step's rows only. A one-row call then
  takes ONNX Runtime's one-row arithmetic, which a tree step's several rows cannot take, so greedy Medusa would no
  longer be token for token greedy vanilla (`docs/graphs.md`, "The extra query row");
* without the input rotations (int8): each quantized matmul reads its input unturned while its weight still
  expects the turn, so the numbers are wrong.

The variants time what such a graph would cost; they never decode anything. Only one-sequence graphs with one
path and no padded matmul rows (fp32, fp16, int8; not int4 graphs built with ``min_rows`` 2). Each variant is held
in memory with its weights (protobuf's 2 GB limit: models up to about 500 M parameters in fp32).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx

from medusa_export.runtime.machine import machine_info
from medusa_export.runtime.manifest import Manifest
from script_io import run_main, with_machine, writable, write_json  # noqa: E402

ROTATION_IN, ROTATION_OUT = "/rotation_in", "/rotation_out"
WARMUP = 5  # steps of each run not counted: they warm the caches


def _rewire(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every reader of tensor ``old`` reads ``new`` instead."""
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == old:
                node.input[k] = new


def _node(graph: onnx.GraphProto, name: str) -> onnx.NodeProto:
    for node in graph.node:
        if node.name == name:
            return node
    raise ValueError(f"the graph has no node {name!r}: not a one-path fused graph of this exporter")


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nothing reads (what a rewiring left behind)."""
    while True:
        read = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o and o in read for o in n.output)]
        if not dead:
            return
        for n in dead:
            graph.node.remove(n)


def without_extra_row(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with GroupQueryAttention fed the step's own rows, positions and mask (no extra row)."""
    g = model.graph
    attention = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    if not attention:
        raise ValueError("the graph has no GroupQueryAttention node: only fused ONNX Runtime graphs")
    for gqa in attention:
        layer = gqa.name.split("/")[0]
        gqa.input[0] = _node(g, f"{layer}/qkv_padded").input[0]
        _rewire(g, _node(g, f"{layer}/attention_rows").output[0], gqa.output[0])
    _rewire(g, _node(g, "positions_padded").output[0], "position_ids")
    _node(g, "attention_bias").input[0] = "attention_mask"
    _prune(g)
    return model


def without_rotation(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with every input rotation removed (each quantized matmul reads its input unturned)."""
    g = model.graph
    turns = [n for n in g.node if n.name.endswith(ROTATION_IN)]
    if not turns:
        raise ValueError("the graph has no input rotation (only int8 graphs carry one)")
    for reshape in turns:
        base = reshape.name[: -len(ROTATION_IN)]
        _rewire(g, _node(g, base + ROTATION_OUT).output[0], reshape.input[0])
    _prune(g)
    return model


def variants(model_path: Path) -> dict[str, bytes]:
    """The graph as built and each variant that applies to it, serialized (weights included). The weights file is
    read once; each variant edits a fresh copy parsed from the graph as built."""
    out = {"as built": onnx.load(str(model_path)).SerializeToString()}
    edits = {"without extra row": [without_extra_row], "without rotation": [without_rotation],
             "without either": [without_extra_row, without_rotation]}
    for name, fns in edits.items():
        model = onnx.load_from_string(out["as built"])
        try:
            for fn in fns:
                model = fn(model)
        except ValueError:
            continue  # that edit does not apply to this graph
        out[name] = model.SerializeToString()
    return out


class BareLoop:
    """One-token steps of a graph on its own KV buffers: bind the token, its position and mask, run, read the id."""

    def __init__(self, graph: bytes, manifest: Manifest, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
        d = manifest.dims
        rng = np.random.default_rng(0)
        shape = (1, d.num_kv_heads, manifest.max_seq, d.head_dim)  # values only need to be finite
        dtype = d.cache_np  # the KV cache's (fp16 graphs, and --kv-cache-dtype fp16, keep it in fp16)
        self.kv = [(0.3 * rng.standard_normal(shape)).astype(dtype) for _ in range(2 * d.num_layers)]
        self.binding = b = self.session.io_binding()
        names = {i.name for i in self.session.get_inputs()}
        for k, buf in enumerate(self.kv):
            layer, kind = divmod(k, 2)
            suffix = f"{layer}.{('key', 'value')[kind]}"
            b.bind_input(f"past_key_values.{suffix}", "cpu", 0, dtype, list(shape), buf.ctypes.data)
            b.bind_output(f"present.{suffix}", "cpu", 0, dtype, list(shape), buf.ctypes.data)
        b.bind_cpu_input("temperature", np.ones(1, np.float32))
        if "output_rows" in names:
            b.bind_cpu_input("output_rows", np.zeros(1, np.int64))
        self.outputs = [o.name for o in self.session.get_outputs() if not o.name.startswith("present.")]
        for name in self.outputs:
            b.bind_output(name, "cpu")
        self.first = len(self.kv)  # get_outputs() follows the order of binding: the KV buffers came first

    def step(self, token: int, past: int) -> dict[str, np.ndarray]:
        """One step of ``token`` after ``past`` cached rows; the graph's outputs other than the KV buffers."""
        b = self.binding
        b.bind_cpu_input("input_ids", np.array([[token]], np.int64))
        b.bind_cpu_input("position_ids", np.array([[past]], np.int64))
        b.bind_cpu_input("attention_mask", np.ones((1, 1, 1, past + 1), bool))
        self.session.run_with_iobinding(b)
        return {name: v.numpy() for name, v in zip(self.outputs, b.get_outputs()[self.first:])}

    def median_ms(self, past: int, steps: int) -> float:
        token, times = 1, []
        for k in range(steps):
            t0 = time.perf_counter()
            out = self.step(token, past + k)
            times.append(time.perf_counter() - t0)
            token = int(out["next_token_ids"].reshape(-1)[0])
        return float(np.median(times[WARMUP:])) * 1e3


def measure(artifact: Path, pasts: list[int], steps: int, repeats: int, threads: int) -> dict:
    manifest = Manifest.read(artifact)
    if steps <= WARMUP:
        raise SystemExit(f"--steps must be more than the {WARMUP} warm-up steps, got {steps}")
    if max(pasts) + steps >= manifest.max_seq:
        raise SystemExit(f"--past {max(pasts)} + {steps} steps do not fit the artifact's {manifest.max_seq} tokens")
    loops = {name: BareLoop(graph, manifest, threads)
             for name, graph in variants(artifact / manifest.graphs["vanilla"].file).items()}
    rows = {}
    for past in pasts:
        times: dict[str, list[float]] = {name: [] for name in loops}
        for _ in range(repeats):  # interleaved: each repeat runs every variant once
            for name, loop in loops.items():
                times[name].append(loop.median_ms(past, steps))
        medians = {name: round(float(np.median(v)), 3) for name, v in times.items()}
        rows[past] = {"ms": medians, "vs_as_built": {n: round(v / medians["as built"], 3) for n, v in medians.items()}}
        print(f"{artifact.name} past {past}: " + "  ".join(f"{n} {v:.2f} ms" for n, v in medians.items()), flush=True)
    return {"weights": manifest.weights, "by_past": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--past", type=int, nargs="+", default=[200, 1800])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=writable)
    args = ap.parse_args()
    report = {"machine": machine_info(), "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
              "artifacts": {str(a): measure(a, args.past, args.steps, args.repeats, args.threads)
                            for a in args.artifacts}}
    if args.json:
        write_json(args.json, with_machine(report), indent=2)


if __name__ == "__main__":
    run_main(main)
