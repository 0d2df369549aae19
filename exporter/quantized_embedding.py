"""A tied embedding read from the lm_head's quantized weights (`com.microsoft.GatherBlockQuantized`).

    record = embed_from_lm_head(model, bits=8, block_size=32)   # rewrites ``model`` in place; None: not tied

When the token embedding and the lm_head are one matrix (tied, as in the default model), `MatMulNBits` quantizes the
lm_head into blocks along the hidden size, one row per vocabulary entry: exactly the layout `GatherBlockQuantized`
gathers rows from. The embedding's Gather then reads those bytes and scales instead of its own fp32 table (113 MB
for the default model, the largest tensor of an int8 / int4 artifact); `shared_weights` stores the bytes once. An
lm_head that is not the embedding (within one quantization step of every element) is left alone.
"""

from __future__ import annotations

import numpy as np


def embed_from_lm_head(model, bits: int, block_size: int) -> dict | None:
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    gather = next((n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
                   and len(inits[n.input[0]].dims) == 2), None)
    if gather is None:
        return None
    table = numpy_helper.to_array(inits[gather.input[0]])
    vocab, hidden = table.shape
    if hidden % block_size:  # GatherBlockQuantized returns whole blocks: rows padded past the hidden size
        return None
    head = next((n for n in graph.node if n.op_type == "MatMulNBits" and len(n.input) == 3 and
                 _attrs(n).get("N") == vocab and _attrs(n).get("K") == hidden and _attrs(n).get("bits") == bits and
                 _attrs(n).get("block_size") == block_size), None)
    if head is None:
        return None
    data = numpy_helper.to_array(inits[head.input[1]]).reshape(vocab, -1)
    scales = numpy_helper.to_array(inits[head.input[2]]).reshape(vocab, -1)
    step = np.repeat(np.abs(scales), block_size, axis=1)[:, :hidden]
    if not np.all(np.abs(_dequantize(data, scales, bits, block_size, hidden) - table) <= step + 1e-6):
        return None  # another matrix: the lm_head is not tied to the embedding
    name = f"{gather.input[0]}_q{bits}"
    graph.initializer.append(numpy_helper.from_array(data, name))
    node = helper.make_node("GatherBlockQuantized", [name, gather.input[1], head.input[2]], list(gather.output),
                            name=gather.name, domain="com.microsoft", bits=bits, block_size=block_size,
                            gather_axis=0, quantize_axis=1)
    index = list(graph.node).index(gather)
    graph.node.remove(gather)
    graph.node.insert(index, node)
    if not any(gather.input[0] in n.input for n in graph.node):
        graph.initializer.remove(inits[gather.input[0]])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return {"op": "GatherBlockQuantized", "lm_head": head.name, "fp32_bytes_dropped": int(table.nbytes)}


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _dequantize(data: np.ndarray, scales: np.ndarray, bits: int, block_size: int, hidden: int) -> np.ndarray:
    """MatMulNBits' symmetric blocks (no zero points: 2^(bits-1)), one row per vocabulary entry; 4-bit values are
    packed two to a byte, low nibble first."""
    q = data.astype(np.int32)
    if bits == 4:
        q = np.stack([q & 15, q >> 4], axis=-1).reshape(len(data), -1)
    q = (q - (1 << (bits - 1)))[:, : scales.shape[1] * block_size].reshape(len(data), scales.shape[1], block_size)
    return (q * scales[:, :, None].astype(np.float32)).reshape(len(data), -1)[:, :hidden]
