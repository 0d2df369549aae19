"""int8 weights for MatMulInteger with activations quantized per row (``build --int8-matmul rows``).

    count = quantize_rows(model, keep=lambda name: False)   # rewrites model.graph in place

Each MatMul of a constant fp32 weight W [K, N] becomes three nodes:

    RowQuantize(x) -> q uint8, s [..., 1]      (runtime/kernels: each row by itself, symmetric, 127 / max|row|)
    MatMulInteger(q, W8, 128) -> y int32       (ONNX Runtime; exact integer sums)
    ScaleRows(y, s, c) -> float                (float(y) * s * c, c: W's per-column scales)

W8 = round(W / c) with c = max|W[:, n]| / 127 per column. The integer product is exact and both custom ops work
row by row, so a row's result depends on nothing but the row: batched, tree and one-token steps agree to the bit.

Where x is the input rotation's output (`rotation`: Reshape, MatMul by ``diag(signs) H / sqrt(B)``, Reshape back),
RowQuantize takes the unturned input and the signs instead and turns each row itself (a fast Walsh-Hadamard
transform), and the three nodes go: no [B, B] MatMul per input, so wider rotation blocks cost next to nothing.
ONNX Runtime runs u8 x s8 MatMulInteger on VNNI / AMX int8 kernels where the CPU has them, at a cost nearly flat in
the number of rows (docs/quantization.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
from onnx import helper, numpy_helper

from medusa_export.runtime import kernels

from .gptq import Rounding, turned_hessian
from .rotation import InputRotation, hadamard, is_rotation
from .source_grid import ZERO, grid_of

ZERO_POINT = 128  # the quantized activations' offset: uint8 q = int8 value + 128
BLOCK, GROUP = 32, 16  # BlockMatMul16: the weights' block along K, the columns one packed line holds


def quantize_rows(model, keep: Callable[[str], bool], turn: Callable[[str], bool] = lambda _name: False,
                  turn_block: int = 32, residual: Callable[[str], bool] = lambda _name: False,
                  rounding: Rounding | None = None, wide: bool = False, grid4: bool = False,
                  per_row: Callable[[str], bool] = lambda _name: False) -> int:
    """Rewrite every MatMul of ``model`` whose weight is a constant 2-D float initializer (and not ``keep(name)``,
    nor an input rotation's, which is folded into the RowQuantize it feeds or left fp32); the number rewritten.
    A MatMul whose input the graph does not turn but ``turn(name)`` names gets the rotation here: its weight turned
    by `rotation.InputRotation` (blocks of up to ``turn_block``; none for an odd input width) and its RowQuantize
    given the signs (`turned_blocks` reads back what was turned).
    A MatMul that ``residual(name)`` names quantizes its input in two passes (``passes = 2``: the row, then what the
    first pass left of it, both through one MatMulInteger; `residual_matmuls` reads them back).
    ``rounding`` (`gptq.Rounding`): the weights of the MatMuls it has an input Hessian for are rounded by GPTQ
    against it (turned as the input is), the others to nearest.
    ``wide``: a MatMul whose K is a positive multiple of 32 and N of 16 becomes one BlockMatMul16 instead (int8
    weights in blocks of 32 along K, rounded to nearest, each row's input as int16 in one pass: `block_int8`;
    ``residual`` and ``rounding`` do not apply to it); the others stay per row as above.
    ``grid4`` (with ``wide``): such a MatMul whose weight already is a 4-bit grid per block of 32 (`source_grid.grid_of`:
    a Q4_0 / Q4_1 GGUF's blocks) becomes one BlockMatMul16Q4 holding that grid (`block_int4`) instead.
    ``per_row(name)``: MatMuls that stay per row even when ``wide`` (the Medusa heads, which only propose drafts: their
    rows multiply with a tree's, and MatMulInteger's cost stays nearly flat in rows where BlockMatMul16's grows).
    Initializers no node reads any more are dropped."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    zero = "rows_int8/zero_point"
    nodes, count, fused, signs_names = [], 0, set(), {}
    turns = _rotation_chains(graph, inits)
    producers = {o: n for n in graph.node for o in n.output}
    rotation = InputRotation(turn_block)
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or keep(node.name) or is_rotation(node.name) or len(weight.dims) != 2:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weight).astype(np.float32)
        chain = turns.get(node.input[0])  # the graph's rotation of this input, folded into the RowQuantize
        block = rotation.block_of(w.shape[0])
        turned = chain is None and turn(node.name) and block > 1  # an odd width has no block to turn
        basis = None  # the block matrix the input is turned by, if it is
        if turned:
            basis = rotation.matrix(block)
            signs = _hadamard_signs(basis)
            w = rotation.weight(w)
        elif chain is not None:
            basis = chain[1][:, None] * hadamard(len(chain[1]))
        name = node.name or node.output[0]
        source = [node.input[0]]
        if chain is not None:  # the rotation's input and signs, its three nodes dropped
            x, signs, chain_outputs = chain
            source = [x, _signs_initializer(graph, signs, signs_names)]
            fused.update(chain_outputs)
        elif turned:
            source.append(_signs_initializer(graph, signs, signs_names))
        blocks_fit = w.shape[0] >= BLOCK and w.shape[0] % BLOCK == 0 and w.shape[1] % GROUP == 0
        if wide and not per_row(node.name) and blocks_fit:
            grid = grid_of(w) if grid4 and basis is None else None  # a turned weight is off its grid
            if grid is not None:
                arrays = dict(zip(("weight_blocks_int4", "block_scale", "block_offset"), block_int4(*grid)))
                op, extra = kernels.BLOCK4_OP, []
            else:
                arrays = dict(zip(("weight_blocks_int8", "block_scale"), block_int8(w)))
                op, extra = kernels.BLOCK_OP, source[1:]
            graph.initializer.extend(numpy_helper.from_array(a, f"{name}/{key}") for key, a in arrays.items())
            nodes.append(helper.make_node(op, [source[0], *(f"{name}/{key}" for key in arrays), *extra],
                                          list(node.output), f"{name}/{op.lower()}", domain=kernels.DOMAIN))
            count += 1
            continue
        scale = column_scale(w)
        hessian = rounding.hessian(node.name) if rounding else None
        if hessian is not None and chain is None and _turned_by_graph(node.input[0], producers):
            hessian = None  # a rotation not folded here: its basis unknown to GPTQ, so rounded to nearest
        if hessian is not None:  # in the basis the MatMul sees
            w8 = rounding(w, hessian if basis is None else turned_hessian(hessian, basis), scale)
        else:
            w8 = nearest_int8(w, scale)
        q, s, y = f"{name}/rows_q", f"{name}/rows_scale", f"{name}/rows_int32"
        graph.initializer.extend([numpy_helper.from_array(w8, f"{name}/weight_int8"),
                                  numpy_helper.from_array(scale, f"{name}/column_scale")])
        passes = {"passes": 2} if residual(node.name) else {}
        nodes += [helper.make_node(kernels.QUANTIZE_OP, source, [q, s], f"{name}/row_quantize",
                                   domain=kernels.DOMAIN, **passes),
                  helper.make_node("MatMulInteger", [q, f"{name}/weight_int8", zero], [y], f"{name}/matmul_integer"),
                  helper.make_node(kernels.SCALE_OP, [y, s, f"{name}/column_scale"], list(node.output),
                                   f"{name}/scale_rows", domain=kernels.DOMAIN, **passes)]
        count += 1
    if any(n.op_type == "MatMulInteger" for n in nodes):
        graph.initializer.append(numpy_helper.from_array(np.array(ZERO_POINT, np.uint8), zero))
    set_kernel_nodes(model, [n for n in nodes if n.output[0] not in fused])
    return count


def block_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w`` [K, N] as BlockMatMul16 takes it: int8 to nearest under one scale per block of 32 along K and column
    (max |block| / 127; 1 for a zero block), packed 16 columns by 2 inputs per 32 bytes ([N/16, K/2, 32]: entry
    [g, j, 2 c + i] is row 2 j + i, column 16 g + c), and the scales as [N/16, K/32, 16] float32."""
    k, n = w.shape
    blocks = w.reshape(k // BLOCK, BLOCK, n)
    peak = np.abs(blocks).max(axis=1)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)  # [K/32, N]
    w8 = np.clip(np.rint(blocks / scale[:, None, :]), -127, 127).astype(np.int8).reshape(k, n)
    packed = w8.reshape(k // 2, 2, n // GROUP, GROUP).transpose(2, 0, 3, 1).reshape(n // GROUP, k // 2, 2 * GROUP)
    return np.ascontiguousarray(packed), np.ascontiguousarray(scale.reshape(k // BLOCK, n // GROUP, GROUP)
                                                              .transpose(1, 0, 2))


def block_int4(q: np.ndarray, step: np.ndarray, low: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 4-bit grid (`source_grid.grid_of`: ``q`` [N, K/32, 32] in 0..15, ``step`` and ``low`` [N, K/32], the weight
    ``step * q + low``) as BlockMatMul16Q4 takes it: the levels packed 16 columns by 2 inputs, pair l of a block in the
    low nibbles of its line l and pair l + 8 in the high ones ([N/16, K/4, 32]: byte 2 c + i of line 8 b + l is
    q[16 g + c, b, 2 l + i] | q[16 g + c, b, 16 + 2 l + i] << 4), the steps and the offsets ``low + 8 step`` (the
    weight is ``step * (q - 8) + offset``; 0 for Q4_0) as [N/16, K/32, 16] float32."""
    n, blocks, _ = q.shape
    t = q.astype(np.uint8).reshape(n // GROUP, GROUP, blocks, 2, BLOCK // 4, 2).transpose(0, 2, 3, 4, 1, 5)
    packed = (t[:, :, 0] | (t[:, :, 1] << 4)).reshape(n // GROUP, blocks * BLOCK // 4, 2 * GROUP)

    def per_group(a: np.ndarray) -> np.ndarray:  # [N, K/32] -> [N/16, K/32, 16]
        return np.ascontiguousarray(a.astype(np.float32).reshape(n // GROUP, GROUP, blocks).transpose(0, 2, 1))

    return np.ascontiguousarray(packed), per_group(step), per_group(low + ZERO * step)


def column_scale(w: np.ndarray) -> np.ndarray:
    """The int8 step of each column of ``w`` [K, N] (max |w[:, n]| / 127; 1 for a zero column), float32."""
    peak = np.abs(w).max(axis=0)
    return np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)


def nearest_int8(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``w`` [K, N] rounded to the nearest step of its column's ``scale``, in -127 .. 127."""
    return np.clip(np.rint(w / scale), -127, 127).astype(np.int8)


def set_kernel_nodes(model, nodes: list) -> None:
    """``nodes`` become the graph's, initializers no node reads are dropped, and the kernel library's domain is
    imported (the rewrites that put its ops in a graph)."""
    graph = model.graph
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == kernels.DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(kernels.DOMAIN, 1))


def _rotation_chains(graph, inits: dict) -> dict:
    """Per tensor that is an input rotation's output read by nothing else but one node: (the rotation's input, its
    signs, the outputs of its three nodes, which name them). Only rotations by ``diag(signs) @ hadamard(B)``
    (`rotation.InputRotation`)."""
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {o.name: 1 for o in graph.output}  # a graph output counts as a reader
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    chains = {}
    for out_reshape in graph.node:
        turn = producer.get(out_reshape.input[0]) if out_reshape.op_type == "Reshape" else None
        if turn is None or turn.op_type != "MatMul" or not is_rotation(turn.name) or turn.input[1] not in inits:
            continue
        in_reshape = producer.get(turn.input[0])
        if in_reshape is None or in_reshape.op_type != "Reshape":
            continue
        signs = _hadamard_signs(numpy_helper.to_array(inits[turn.input[1]]))
        if signs is None or any(readers.get(t, 0) != 1 for t in (in_reshape.output[0], turn.output[0],
                                                                   out_reshape.output[0])):
            continue
        chains[out_reshape.output[0]] = (in_reshape.input[0], signs, {in_reshape.output[0], turn.output[0],
                                                                    out_reshape.output[0]})
    return chains


def _turned_by_graph(tensor: str, producers: dict) -> bool:
    """Whether ``tensor`` is an input rotation's output (`fused_backbone`: a Reshape named */rotation_out)."""
    node = producers.get(tensor)
    return node is not None and node.op_type == "Reshape" and node.name.endswith("/rotation_out")


def _hadamard_signs(matrix: np.ndarray) -> np.ndarray | None:
    """``s`` where ``matrix`` is ``diag(s) @ hadamard(B)`` (B a power of two), else None."""
    b = matrix.shape[0]
    if matrix.ndim != 2 or matrix.shape != (b, b) or b < 2 or b & (b - 1):
        return None
    signs = np.sign(matrix[:, 0]).astype(np.float32)
    return signs if np.allclose(matrix, signs[:, None] * hadamard(b), atol=1e-6) else None


def _signs_initializer(graph, signs: np.ndarray, added: dict[bytes, str]) -> str:
    """The name of an initializer holding ``signs``, added at their first use and remembered in ``added`` (every
    layer's rotation of a block size shares one matrix, so one initializer serves them all)."""
    key = signs.tobytes()
    if key not in added:
        added[key] = f"rows_int8/rotation_signs{len(signs)}_{hashlib.sha256(key).hexdigest()[:8]}"
        graph.initializer.append(numpy_helper.from_array(signs, added[key]))
    return added[key]


def turned_blocks(graph, names: Callable[[str], bool]) -> list[int]:
    """The rotation block of each RowQuantize or BlockMatMul16 whose node name ``names`` selects: its signs' length,
    0 where it gets none (what a manifest records of the rotation `quantize_rows` applied)."""
    inits = {i.name: i for i in graph.initializer}
    signs_at = {kernels.QUANTIZE_OP: 1, kernels.BLOCK_OP: 3}
    return [int(inits[n.input[at]].dims[0]) if len(n.input) > at and n.input[at] in inits else 0
            for n in graph.node if (at := signs_at.get(n.op_type)) is not None and names(n.name)]


def residual_matmuls(graph) -> list[str]:
    """The names of the RowQuantize nodes that quantize in two passes (`quantize_rows`' ``residual``)."""
    return [n.name for n in graph.node if n.op_type == kernels.QUANTIZE_OP
            and any(a.name == "passes" and a.i == 2 for a in n.attribute)]
