"""An fp32 lm_head screened by an int8 product (``build --lm-head screened``): exact top words for a fraction of the
fp32 product's cost.

    info = screen_lm_head(model)     # rewrites model.graph in place (a fused or lanes graph with fp32 weights)

The traced tail computes every word's fp32 logit (576 x 49,152 on the default model: 113 MB of weights read per
step, about a sixth of an fp32 one-token step) and then reduces them. Here the base model's reduction becomes:

    RowQuantize(hidden, passes=2) -> MatMulInteger(q, W8) -> ScaleRows(passes=2) -> approx   (int8, 28 MB)
    ScreenedVocab(approx, hidden, W rows, bounds, [input_ids], temperature) -> the reduced outputs

ScreenedVocab (`runtime/kernels/screened_vocab.c`) bounds each word's error from the int8 product, computes the exact
fp32 logit of every word that could rank among the top ``sample_topk``, and returns those words in their exact order:
greedy decoding takes the exact argmax of fp32 logits. The probabilities and the entropy use the exact logits of
those words and the int8 product's for the rest. The build also runs the heads' matmuls (their blocks and projection,
which only propose drafts) as int8 per row in fp32 artifacts (`quantize_rows`, names under `HEADS_SCOPE`).

``bounds`` [2, V]: per word ``|w_v|`` and ``|w_v - w^_v|`` (its int8 column's error), computed in float64 and rounded
up to float32 so the bound never falls short.
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from medusa_export.runtime import kernels
from medusa_export.runtime.errors import ExportValidationError

from .quantize_rows import ZERO_POINT, column_scale, nearest_int8, set_kernel_nodes

REDUCED = ("next_token_ids", "next_token_probs", "input_token_probs", "entropy")  # the op's outputs, in order
PREFIX = "lm_head_screen"
HEADS_SCOPE = "//heads/"  # the traced tail's Medusa heads (their blocks and projection: "tail//heads/...")


def screen_lm_head(model, top_k: int) -> dict:
    """Replace the base lm_head's MatMul and vocabulary reduction of ``model`` by the screened form; what it did."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    matmul = _lm_head_matmul(producers, inits)
    w = numpy_helper.to_array(inits[matmul.input[1]]).astype(np.float32)  # [H, V]
    # Per word on -127 .. 127, as `quantize_rows`. The bound needs the integer product exact: on x86 CPUs without VNNI,
    # ONNX Runtime's uint8 x int8 MatMulInteger clips pairs of products to 16 bits unless the session asks for exact
    # products, which `kernels.register` does on such CPUs (7 bits would avoid the clipping too, but keep 5x more
    # words per row on the default model).
    scale = column_scale(w)
    w8 = nearest_int8(w, scale)
    drift = np.linalg.norm(w.astype(np.float64) - w8.astype(np.float64) * scale, axis=0)
    bounds = np.stack([_rounded_up(np.linalg.norm(w.astype(np.float64), axis=0)), _rounded_up(drift)])
    outputs = {o.name for o in graph.output}
    names = {n.name for n in graph.input}
    temperature = "temperature" if "temperature" in names else "row_temperature"
    ids = "input_ids" if "input_token_probs" in outputs else ""
    p = PREFIX
    graph.initializer.extend([numpy_helper.from_array(w8, f"{p}/weight_int8"),
                              numpy_helper.from_array(scale, f"{p}/column_scale"),
                              numpy_helper.from_array(np.ascontiguousarray(w.T), f"{p}/weight_rows"),
                              numpy_helper.from_array(bounds.astype(np.float32), f"{p}/bounds"),
                              numpy_helper.from_array(np.array(ZERO_POINT, np.uint8), f"{p}/zero_point")])
    kept = [n for n in graph.node if not set(n.output) & set(REDUCED)]
    hidden = matmul.input[0]
    kept += [
        helper.make_node(kernels.QUANTIZE_OP, [hidden], [f"{p}/q", f"{p}/row_scale"], f"{p}/row_quantize",
                         domain=kernels.DOMAIN, passes=2),
        helper.make_node("MatMulInteger", [f"{p}/q", f"{p}/weight_int8", f"{p}/zero_point"], [f"{p}/int32"],
                         f"{p}/matmul_integer"),
        helper.make_node(kernels.SCALE_OP, [f"{p}/int32", f"{p}/row_scale", f"{p}/column_scale"], [f"{p}/approx"],
                         f"{p}/scale_rows", domain=kernels.DOMAIN, passes=2),
        helper.make_node(kernels.SCREEN_OP, [f"{p}/approx", hidden, f"{p}/weight_rows", f"{p}/bounds", ids, temperature],
                         [n if n in outputs else "" for n in REDUCED], f"{p}/screen", domain=kernels.DOMAIN,
                         top_k=top_k),
    ]
    set_kernel_nodes(model, _live(kept, outputs))
    return {"vocab": int(w.shape[1]), "hidden": int(w.shape[0]), "mean_bound_norm": float(bounds[1].mean())}


def _lm_head_matmul(producers: dict, inits: dict):
    """The MatMul whose logits the base top-k reads (TopK <- [Cast] <- MatMul of a constant [H, V] weight)."""
    node = producers.get("next_token_ids")
    node = producers.get(node.input[0]) if node is not None and node.op_type == "TopK" else None
    if node is not None and node.op_type == "Cast":
        node = producers.get(node.input[0])
    if node is None or node.op_type != "MatMul" or node.input[1] not in inits or len(inits[node.input[1]].dims) != 2:
        raise ExportValidationError("--lm-head screened found no base lm_head MatMul feeding the top-k in this graph: "
                                    "build with --lm-head full and report the model type")
    return node


def _rounded_up(values: np.ndarray) -> np.ndarray:
    """float32 values no smaller than the float64 ``values``."""
    out = values.astype(np.float32)
    return np.where(out.astype(np.float64) < values, np.nextafter(out, np.float32(np.inf)), out)


def _live(nodes: list, outputs: set[str]) -> list:
    """``nodes`` (in order) that some graph output depends on."""
    producer = {o: n for n in nodes for o in n.output if o}
    needed, stack, live = set(), list(outputs), set()
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if name in needed or node is None:
            continue
        needed.add(name)
        if id(node) not in live:
            live.add(id(node))
            stack.extend(i for i in node.input if i)
    return [n for n in nodes if id(n) in live]
