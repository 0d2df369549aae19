"""Weights that already lie on a 4-bit grid (a model read from a Q4_0 / Q4_1 GGUF), kept exactly in 4 bits.

    if on_4bit_grid(model):                        # every decoder Linear, checked in PyTorch before export
        n = exact_4bit_matmuls(onnx_model, accuracy_level=4)   # rewrites the graph's grid MatMuls in place

A GGUF Q4_1 block stores 32 consecutive weights of a row as ``d * q + m`` (q in 0..15); Q4_0 is the case
``m = -8 d``. The built-in model is such a file: its "fp32" weights are those blocks dequantized. Quantizing them
again on another grid (``MatMulNBits``' symmetric one) adds a second rounding to every weight (the old int4 recipe:
77 % top-1 agreement with fp32 on held-out prompts). Here each block is written back as it was:

    x @ W  =  MatMulNBits(x; q, d, zero point 8)  +  blocksum(x) @ (m + 8 d)

the first term ``d * (q - 8)`` per block, the second two small fp32 MatMuls (the sums of each block of 32 input
values, then the offsets; left out when every block has ``m = -8 d``, as in Q4_0). The weights are then the source's, bit for bit;
what differs from fp32 is only ``MatMulNBits``' int8 activations (accuracy level 4). Measured on the default model
(docs/quantization.md): 95.2-97.6 % top-1 agreement on four prompt sets, perplexity within 0.34 %.

Every row is computed by itself (the block sums and the correction are per row), so a row's numbers do not depend
on the other rows of the step, as ``MatMulNBits`` alone.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32  # GGUF's block of Q4_0 / Q4_1 (and MatMulNBits' block here)
LEVELS = 15  # q in 0..15
F32_GROUP = 16  # BlockMatMulF32Q4: the columns one packed line holds
ZERO = 8  # MatMulNBits' zero point for 4 bits when none is given
OFFSET_SUFFIXES = ("/grid_sums", "/grid_offsets")  # the offset term's two MatMuls: small, exact, left fp32


def is_offset(node_name: str) -> bool:
    return node_name.endswith(OFFSET_SUFFIXES)


def _blocks(w: np.ndarray) -> np.ndarray | None:
    """``w`` [in, out] as float64 blocks ``[out, in / 32, 32]`` of 32 consecutive inputs; None without whole blocks."""
    if w.ndim != 2 or w.shape[0] % BLOCK:
        return None
    return w.T.astype(np.float64).reshape(w.shape[1], w.shape[0] // BLOCK, BLOCK)


def grid_of(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``w`` [in, out] as ``(q [out, in / 32, 32] uint8, d [out, in / 32], m [out, in / 32])`` with
    ``w == d * q + m`` exactly in float32 per block of 32 inputs; None if ``w`` is not on such a grid.

    Each block is tried as llama.cpp writes Q4_0 (``d`` = the value of largest magnitude / -8, ``m = -8 d``, d of
    either sign; such a block need not use every level) and as it writes Q4_1 (``m`` the block's minimum, ``d`` its
    range / 15: the block spans q = 0..15)."""
    blocks = _blocks(w)
    if blocks is None:
        return None

    def fit(step: np.ndarray, offset: np.ndarray):
        """Levels of every block on the grid ``step * q + offset``, and which blocks that grid holds exactly."""
        q = np.rint((blocks - offset[..., None]) / np.where(step == 0, 1.0, step)[..., None])
        ok = ((q >= 0) & (q <= LEVELS)).all(-1)
        ok &= ((step[..., None] * q + offset[..., None]).astype(np.float32) == blocks.astype(np.float32)).all(-1)
        return q, step, offset, ok

    largest = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
    q4_0 = fit(largest / -ZERO, largest)  # first: a block it fits needs no offset term, though Q4_1's form may fit too
    low = blocks.min(-1)
    q4_1 = fit((blocks.max(-1) - low) / LEVELS, low)
    if not (q4_0[3] | q4_1[3]).all():
        return None
    first = q4_0[3]
    q = np.where(first[..., None], q4_0[0], q4_1[0])
    return q.astype(np.uint8), np.where(first, q4_0[1], q4_1[1]), np.where(first, q4_0[2], q4_1[2])


def grid8_of(w: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``w`` [in, out] as ``(q [out, in / 32, 32] int8 in -127..127, d [out, in / 32])`` with ``w == d * q`` exactly
    in float32 per block of 32 inputs (GGUF's Q8_0: ``d = max|w| / 127``); None if ``w`` is not on such a grid.
    ONNX Runtime's own 8-bit quantizer divides by 128 instead, which moves every weight of a Q8_0 tensor."""
    blocks = _blocks(w)
    if blocks is None:
        return None
    step = np.abs(blocks).max(-1) / 127
    q = np.rint(blocks / np.where(step == 0, 1.0, step)[..., None])
    if not np.array_equal((step[..., None] * q).astype(np.float32), blocks.astype(np.float32)):
        return None
    return q.astype(np.int8), step


def fma_grid_of(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``w`` [in, out] as BlockMatMulF32Q4 takes it (`runtime/kernels/block_f32.c`): ``(packed [out / 16, in / 2,
    16] uint8, step, low [out / 16, in / 32, 16] float16)`` with ``fma(step, q, low) == w`` in float32 for every
    weight (one rounding, as the kernel computes it; the same value, a -0 of a Q4_0 block rebuilt as +0); None where
    ``w`` is not such a grid, its steps or lows not fp16 values (GGUF's d and m are) or its width not whole groups
    of 16. Byte c of line j of group g holds q[2 j, 16 g + c] | q[2 j + 1, 16 g + c] << 4."""
    grid = grid_of(w)
    if grid is None or w.shape[1] % F32_GROUP:
        return None
    q, step, low = grid  # [out, in / 32, 32], [out, in / 32]
    step32, low32 = step.astype(np.float32), low.astype(np.float32)
    if not (np.array_equal(step32.astype(np.float16).astype(np.float32), step32) and
            np.array_equal(low32.astype(np.float16).astype(np.float32), low32)):
        return None
    # fp16 step and low: step * q + low needs well under float64's 53 bits, so rounding the float64 sum once to
    # float32 is what the kernel's fma gives
    total = step32.astype(np.float64)[..., None] * q + low32.astype(np.float64)[..., None]
    if not (total.astype(np.float32) == _blocks(w).astype(np.float32)).all():
        return None
    out, blocks, _ = q.shape
    levels = q.reshape(out // F32_GROUP, F32_GROUP, blocks * BLOCK // 2, 2).transpose(0, 2, 1, 3)
    packed = (levels[..., 0] | (levels[..., 1] << 4)).astype(np.uint8)

    def per_group(a: np.ndarray) -> np.ndarray:  # [out, in / 32] -> [out / 16, in / 32, 16]
        return np.ascontiguousarray(a.reshape(out // F32_GROUP, F32_GROUP, blocks).transpose(0, 2, 1))

    return np.ascontiguousarray(packed), per_group(step32.astype(np.float16)), per_group(low32.astype(np.float16))


def exact_f32_matmuls(model, skip=lambda name: False) -> int:
    """Rewrite (in place) every MatMul of the onnx ``model`` whose constant weight `fma_grid_of` takes as the kernel
    library's BlockMatMulF32Q4: the same fp32 weights and fp32 arithmetic, 5 bits of each read per row instead
    of 32. The number rewritten. ``skip(node_name)``: MatMuls left alone."""
    from onnx import helper, numpy_helper

    from medusa_export.runtime import kernels

    def convert(w: str, array: np.ndarray):
        grid = fma_grid_of(array)
        if grid is None:
            return None
        names = (f"{w}_f32q4", f"{w}_f32q4_step", f"{w}_f32q4_low")
        return [numpy_helper.from_array(a, n) for a, n in zip(grid, names)], names

    def rewrite(node, converted) -> list:
        return [helper.make_node(kernels.BLOCK_F32_OP, [node.input[0], *converted[1]], list(node.output),
                                 name=node.name, domain=kernels.DOMAIN)]

    rewritten = _rewrite_weight_matmuls(model, skip, convert, rewrite)
    if rewritten and not any(o.domain == kernels.DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(kernels.DOMAIN, 1))
    return rewritten


def on_4bit_grid(model, fit=grid_of) -> bool:
    """Whether every Linear weight of ``model``'s decoder layers (a transformers causal LM) is a 4-bit grid per
    block of 32 inputs: the source was 4-bit, and `exact_4bit_matmuls` can keep it exactly. ``fit``: the test of one
    weight [in, out] (`fma_grid_of`: a grid that BlockMatMulF32Q4 can rebuild, for ``--fp32-matmul blocks``)."""
    weights = [m.weight for layer in model.model.layers for m in layer.modules()
               if type(m).__name__ == "Linear"]
    return bool(weights) and all(fit(w.detach().float().numpy().T) is not None for w in weights)


def exact_8bit_matmuls(model, accuracy_level: int, skip=lambda name: False) -> int:
    """Rewrite (in place) every MatMul of the onnx ``model`` whose constant weight is a symmetric 8-bit grid (a
    Q8_0 tensor, as the built-in model's tied embedding / lm_head) as an 8-bit ``MatMulNBits`` holding it
    exactly; the number rewritten. ``skip(node_name)``: MatMuls left alone."""
    from onnx import helper, numpy_helper

    def convert(w: str, array: np.ndarray):
        grid = grid8_of(array)
        if grid is None:
            return None
        q, step = grid
        data = [numpy_helper.from_array((q.astype(np.int16) + 128).astype(np.uint8), f"{w}_q8"),
                numpy_helper.from_array(step.astype(np.float32), f"{w}_scales")]  # [out, blocks]: 2-D, as
        return data, q.shape  # GatherBlockQuantized wants for a tied embedding

    def rewrite(node, converted) -> list:
        _, (n, blocks, _) = converted
        w = node.input[1]  # zero point 128: MatMulNBits' default for 8 bits
        return [helper.make_node("MatMulNBits", [node.input[0], f"{w}_q8", f"{w}_scales"], list(node.output),
                                 name=node.name, domain="com.microsoft", K=blocks * BLOCK, N=n, bits=8,
                                 block_size=BLOCK, accuracy_level=accuracy_level)]

    return _rewrite_weight_matmuls(model, lambda name: skip(name) or is_offset(name), convert, rewrite)


def exact_4bit_matmuls(model, accuracy_level: int, skip=lambda name: False) -> int:
    """Rewrite (in place) every MatMul of the onnx ``model`` whose constant weight is a 4-bit grid as
    ``MatMulNBits`` plus its offset term; the number rewritten. ``skip(node_name)``: MatMuls left alone."""
    from onnx import helper, numpy_helper

    sums_added: set[int] = set()

    def convert(w: str, array: np.ndarray):
        grid = grid_of(array)
        if grid is None:
            return None
        q, step, low = grid
        n, blocks, _ = q.shape
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # two 4-bit values per byte, low one first
        data = [numpy_helper.from_array(packed, f"{w}_q4"),
                numpy_helper.from_array(step.reshape(-1).astype(np.float32), f"{w}_scales")]
        offset = (low + ZERO * step).T.astype(np.float32)  # [in / 32, out]: what d * (q - 8) leaves out per block
        if offset.any():
            data.append(numpy_helper.from_array(offset, f"{w}_offsets"))
            width = blocks * BLOCK
            if width not in sums_added:  # one block-sums matrix per input width, shared by its MatMuls
                sums_added.add(width)
                sums = np.zeros((width, blocks), np.float32)  # column b adds up block b of a row's inputs
                sums[np.arange(width), np.arange(width) // BLOCK] = 1.0
                data.append(numpy_helper.from_array(sums, f"grid_block_sums{width}"))
        return data, (n, blocks, bool(offset.any()))

    def rewrite(node, converted) -> list:
        _, (n, blocks, has_offsets) = converted
        w, name, x = node.input[1], node.name, node.input[0]
        main = f"{name}/grid" if has_offsets else node.output[0]
        nodes = [helper.make_node("MatMulNBits", [x, f"{w}_q4", f"{w}_scales"], [main], name=name,
                                  domain="com.microsoft", K=blocks * BLOCK, N=n, bits=4, block_size=BLOCK,
                                  accuracy_level=accuracy_level)]
        if has_offsets:  # MatMuls, so any rank of x works (the heads' input is [batch, rows, heads, hidden])
            nodes += [
                helper.make_node("MatMul", [x, f"grid_block_sums{blocks * BLOCK}"], [f"{name}/block_sums"],
                                 name=name + OFFSET_SUFFIXES[0]),
                helper.make_node("MatMul", [f"{name}/block_sums", f"{w}_offsets"], [f"{name}/offsets"],
                                 name=name + OFFSET_SUFFIXES[1]),
                helper.make_node("Add", [main, f"{name}/offsets"], [node.output[0]], name=f"{name}/with_offsets")]
        return nodes

    return _rewrite_weight_matmuls(model, skip, convert, rewrite)


def _rewrite_weight_matmuls(model, skip, convert, rewrite) -> int:
    """Replace each MatMul whose constant weight ``convert(name, array)`` accepts by ``rewrite(node, converted)``;
    a weight read by several MatMuls is converted once, and its fp32 initializer leaves the graph when no node
    reads it any more. The number of MatMuls replaced."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    converted: dict[str, object] = {}
    nodes, rewritten = [], 0
    for node in graph.node:
        w = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        eligible = w in inits and not skip(node.name)
        if eligible and w not in converted:
            converted[w] = convert(w, numpy_helper.to_array(inits[w]))
            if converted[w] is not None:
                graph.initializer.extend(converted[w][0])
        if eligible and converted[w] is not None:
            nodes += rewrite(node, converted[w])
            rewritten += 1
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    still_read = {name for node in graph.node for name in node.input}
    for w, done in converted.items():
        if done is not None and w not in still_read:
            graph.initializer.remove(inits[w])
    return rewritten
