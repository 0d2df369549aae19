"""Weights that already lie on a 4-bit grid (a model read from a Q4_0 / Q4_1 GGUF), kept exactly in 4 bits.

    if on_4bit_grid(model):                        # every decoder Linear, checked in PyTorch before export
        n = exact_4bit_matmuls(onnx_model, accuracy_level=4)   # rewrites the graph's grid MatMuls in place

A GGUF Q4_1 block stores 32 consecutive weights of a row as ``d * q + m`` (q in 0..15); Q4_0 is the case
``m = -8 d``. The built-in model is such a file: its "fp32" weights are those blocks dequantized. Quantizing them
again on another grid (``MatMulNBits``' symmetric one) adds a second rounding to every weight (the old int4 recipe:
77 % top-1 agreement with fp32 on held-out prompts). Here each block is written back as it was:

    x @ W  =  MatMulNBits(x; q, d, zero point 8)  +  blocksum(x) @ (m + 8 d)

the first term ``d * (q - 8)`` per block, the second a small fp32 MatMul over the sums of each block of 32 input
values (left out when every block has ``m = -8 d``, as in Q4_0). The weights are then the source's, bit for bit;
what differs from fp32 is only ``MatMulNBits``' int8 activations (accuracy level 4). Measured on the default model
(docs/quantization.md): 97.4 % top-1 agreement, perplexity +0.5 %.

Every row is computed by itself (the block sums and the correction are per row), so a row's numbers do not depend
on the other rows of the step, as ``MatMulNBits`` alone.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32  # GGUF's block of Q4_0 / Q4_1 (and MatMulNBits' block here)
LEVELS = 15  # q in 0..15
ZERO = 8  # MatMulNBits' zero point for 4 bits when none is given


def grid_of(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``w`` [in, out] as ``(q [out, in / 32, 32] uint8, d [out, in / 32], m [out, in / 32])`` with
    ``w == d * q + m`` exactly in float32 per block of 32 inputs; None if ``w`` is not on such a grid."""
    if w.ndim != 2 or w.shape[0] % BLOCK:
        return None
    k, n = w.shape
    blocks = w.T.astype(np.float64).reshape(n, k // BLOCK, BLOCK)
    low, high = blocks.min(-1), blocks.max(-1)
    step = (high - low) / LEVELS
    q = np.rint((blocks - low[..., None]) / np.where(step == 0, 1.0, step)[..., None])
    if (q < 0).any() or (q > LEVELS).any():
        return None
    rebuilt = (step[..., None] * q + low[..., None]).astype(np.float32)
    if not np.array_equal(rebuilt, blocks.astype(np.float32)):
        return None
    return q.astype(np.uint8), step, low


def grid8_of(w: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``w`` [in, out] as ``(q [out, in / 32, 32] int8 in -127..127, d [out, in / 32])`` with ``w == d * q`` exactly
    in float32 per block of 32 inputs (GGUF's Q8_0: ``d = max|w| / 127``); None if ``w`` is not on such a grid.
    ONNX Runtime's own 8-bit quantizer divides by 128 instead, which moves every weight of a Q8_0 tensor."""
    if w.ndim != 2 or w.shape[0] % BLOCK:
        return None
    k, n = w.shape
    blocks = w.T.astype(np.float64).reshape(n, k // BLOCK, BLOCK)
    step = np.abs(blocks).max(-1) / 127
    q = np.rint(blocks / np.where(step == 0, 1.0, step)[..., None])
    if not np.array_equal((step[..., None] * q).astype(np.float32), blocks.astype(np.float32)):
        return None
    return q.astype(np.int8), step


def on_4bit_grid(model) -> bool:
    """Whether every Linear weight of ``model``'s decoder layers (a transformers causal LM) is a 4-bit grid per
    block of 32 inputs: the source was 4-bit, and `exact_4bit_matmuls` can keep it exactly."""
    weights = [m.weight for layer in model.model.layers for m in layer.modules()
               if type(m).__name__ == "Linear"]
    return bool(weights) and all(grid_of(w.detach().float().numpy().T) is not None for w in weights)


def exact_8bit_matmuls(model, accuracy_level: int, skip=lambda name: False) -> int:
    """Rewrite (in place) every MatMul of the onnx ``model`` whose constant weight is a symmetric 8-bit grid (a
    Q8_0 tensor, as the built-in model's tied embedding / lm_head) as an 8-bit ``MatMulNBits`` holding it
    exactly; the number rewritten. ``skip(node_name)``: MatMuls left alone."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    rewritten = 0
    for i, node in enumerate(graph.node):
        if node.op_type != "MatMul" or node.input[1] not in inits or skip(node.name):
            continue
        grid = grid8_of(numpy_helper.to_array(inits[node.input[1]]))
        if grid is None:
            continue
        q, step = grid
        n, blocks, _ = q.shape
        w = node.input[1]
        graph.initializer.remove(inits.pop(w))
        graph.initializer.extend([numpy_helper.from_array((q.astype(np.int16) + 128).astype(np.uint8), f"{w}_q8"),
                                  numpy_helper.from_array(step.astype(np.float32), f"{w}_scales")])  # [out, blocks]
        graph.node[i].CopyFrom(helper.make_node(  # zero point 128: MatMulNBits' default for 8 bits
            "MatMulNBits", [node.input[0], f"{w}_q8", f"{w}_scales"], list(node.output), name=node.name,
            domain="com.microsoft", K=blocks * BLOCK, N=n, bits=8, block_size=BLOCK, accuracy_level=accuracy_level))
        rewritten += 1
    return rewritten


def exact_4bit_matmuls(model, accuracy_level: int, skip=lambda name: False) -> int:
    """Rewrite (in place) every MatMul of the onnx ``model`` whose constant weight is a 4-bit grid as
    ``MatMulNBits`` plus its offset term; the number rewritten. ``skip(node_name)``: MatMuls left alone."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, rewritten = [], 0
    for node in graph.node:
        grid = None
        if node.op_type == "MatMul" and node.input[1] in inits and not skip(node.name):
            grid = grid_of(numpy_helper.to_array(inits[node.input[1]]))
        if grid is None:
            nodes.append(node)
            continue
        q, step, low = grid
        n, blocks, _ = q.shape
        w, name, x = node.input[1], node.name, node.input[0]
        graph.initializer.remove(inits.pop(w))
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # two 4-bit values per byte, low one first
        graph.initializer.extend([numpy_helper.from_array(packed, f"{w}_q4"),
                                  numpy_helper.from_array(step.reshape(-1).astype(np.float32), f"{w}_scales")])
        offset = (low + ZERO * step).T.astype(np.float32)  # [in / 32, out]: what d * (q - 8) leaves out per block
        main = node.output[0] if not offset.any() else f"{name}/grid"
        nodes.append(helper.make_node("MatMulNBits", [x, f"{w}_q4", f"{w}_scales"], [main], name=name,
                                      domain="com.microsoft", K=blocks * 32, N=n, bits=4, block_size=BLOCK,
                                      accuracy_level=accuracy_level))
        if offset.any():
            graph.initializer.extend([numpy_helper.from_array(offset, f"{w}_offsets"),
                                      numpy_helper.from_array(np.array([0, 0, blocks, BLOCK], np.int64), f"{w}_blocks"),
                                      numpy_helper.from_array(np.array([-1], np.int64), f"{w}_last_axis")])
            nodes += [
                helper.make_node("Reshape", [x, f"{w}_blocks"], [f"{name}/in_blocks"], name=f"{name}/in_blocks"),
                helper.make_node("ReduceSum", [f"{name}/in_blocks", f"{w}_last_axis"], [f"{name}/block_sums"],
                                 name=f"{name}/block_sums", keepdims=0),
                helper.make_node("MatMul", [f"{name}/block_sums", f"{w}_offsets"], [f"{name}/offsets"],
                                 name=name + OFFSET_SUFFIX),
                helper.make_node("Add", [main, f"{name}/offsets"], [node.output[0]], name=f"{name}/with_offsets")]
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten


OFFSET_SUFFIX = "/grid_offsets"  # the offset MatMuls stay fp32: their weight is not a grid, and they are tiny


def is_offset(node_name: str) -> bool:
    return node_name.endswith(OFFSET_SUFFIX)
