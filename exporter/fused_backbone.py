"""The decoder stack of a Llama-family model as an ONNX Runtime graph of fused operators, written directly from
the weights (no tracing): about 11 nodes per layer instead of the ~115 a traced graph keeps.

    graph = fused_backbone(hf_model.model, hf_model.config, max_positions=2048)   # GraphProto, output "hidden"

Per layer::

    SkipSimplifiedLayerNormalization (residual add + RMSNorm)
    MatMul (packed q|k|v) [+ Add bias]  ->  com.microsoft.GroupQueryAttention (rotary at position_ids,
                                              tree mask as attention_bias, KV written into the cache in place)
    MatMul (o)  ->  SkipSimplifiedLayerNormalization  ->  MatMul (packed gate|up) -> Split -> SiLU(gate)*up
    MatMul (down)

A Medusa graph built with ``paths`` > 1 runs attention once per root-to-leaf path of the tree, each path a group
of heads on its own copy of the cache, so every node's numbers equal a one-token step's bit for bit
(runtime/tree_paths.py); the matmuls still run once per node.

KV cache: head-major ``[batch, kv_heads, capacity, head_dim]`` buffers that are both ``past_key_values.*``
and ``present.*`` (ONNX Runtime's shared-buffer mode: GroupQueryAttention writes the T new rows at
``past`` in place when the two are bound to the same memory). ``seqlens_k`` / ``total_sequence_length``
come from the attention mask's width, so the graph's inputs are those of the portable graph.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from medusa_export.runtime import io_table
from medusa_export.runtime.errors import ModelError

MS = "com.microsoft"


class _Graph:
    """Nodes and initializers under construction, with unique names."""

    def __init__(self, np_dtype: np.dtype) -> None:
        self.nodes, self.inits, self.np_dtype = [], [], np_dtype

    def weight(self, name: str, array, cast: bool = True) -> str:
        value = np.ascontiguousarray(array, self.np_dtype if cast else None)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int = 1, domain: str = "", **attrs) -> list[str]:
        outs = [f"{name}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs


def check_supported(config) -> None:
    """ModelError unless the fused builder covers this architecture exactly (else use the portable graph)."""
    problems = []
    if config.model_type not in ("llama", "mistral", "qwen2"):
        problems.append(f"model type {config.model_type!r}")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"activation {config.hidden_act!r}")
    if getattr(config, "mlp_bias", False):
        problems.append("MLP biases")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) and config.model_type == "mistral":
        problems.append("sliding-window attention")
    if problems:
        raise ModelError(f"the fused ONNX Runtime graph does not cover {', '.join(problems)}: "
                         f"build with --graph portable")


def _rotary_cache(decoder, max_positions: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [max_positions, head_dim / 2] from the model's own rotary module (covers its scaling)."""
    import torch

    with torch.no_grad():
        pos = torch.arange(max_positions)[None]
        cos, sin = decoder.rotary_emb(torch.zeros(1, 1, head_dim, dtype=torch.float32), pos)
    cos, sin = cos[0].float().numpy(), sin[0].float().numpy()
    half = head_dim // 2
    if not (np.allclose(cos[:, :half], cos[:, half:]) and np.allclose(sin[:, :half], sin[:, half:])):
        raise ModelError("the model's rotary embedding is not the rotate-half kind: build with --graph portable")
    return cos[:, :half], sin[:, :half]


def fused_backbone(decoder, cfg, max_positions: int, dtype: str = "float32", paths: int = 1):
    """GraphProto for ``decoder`` (a transformers ``*Model``: embeddings .. final norm) with config ``cfg``:
    inputs input_ids, position_ids, attention_mask, past_key_values.*; outputs hidden ([batch, seq, hidden],
    after the final norm) and present.*.

    ``paths`` > 1: attention runs per root-to-leaf path of the tree (runtime/tree_paths.py), each path a group
    of heads with its own copy of the KV cache (``[1, paths * kv_heads, capacity, head_dim]``); the step's
    attention rows are depths, mapped from and back to nodes by the inputs ``path_rows`` / ``node_rows``, and
    ``attention_mask`` is causal over those rows."""
    check_supported(cfg)
    np_dtype = io_table.model_dtype_of(dtype)
    n, nh = cfg.num_hidden_layers, cfg.num_attention_heads
    kvh = getattr(cfg, "num_key_value_heads", None) or nh
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    eps = float(cfg.rms_norm_eps)
    sd = {"model." + k: v.detach().float().numpy() for k, v in decoder.state_dict().items()}
    g = _Graph(np_dtype)
    f = helper.np_dtype_to_tensor_dtype(np_dtype)

    # Per step, shared by every layer: the GQA lengths and the additive mask, for T + 1 query rows. ONNX Runtime's
    # GroupQueryAttention computes a one-row step with other arithmetic than a several-row step (last-bit
    # differences, which int8 activation quantization then amplifies). One extra row, a copy of the last, keeps
    # every step on the several-row path, so a tree node gets exactly the numbers a one-token step gets and greedy
    # Medusa stays token-for-token equal to greedy vanilla at every dtype. No real row sees the extra one (its key
    # column is masked); its KV row lands one past the step's rows and is overwritten later.
    last = g.weight("last", np.array([-1], np.int64), cast=False)
    end = g.weight("end", np.array([np.iinfo(np.int64).max], np.int64), cast=False)
    one = g.weight("one_i64", np.array([1], np.int64), cast=False)
    axis1, axis2, axis3 = (g.weight(f"axis{a}", np.array([a], np.int64), cast=False) for a in (1, 2, 3))
    row_positions = "position_ids"
    if paths > 1:  # the rows' positions: those of the longest path (path 0), one per depth
        first_path = g.op("Gather", ["path_rows", g.weight("zero_index", np.array(0, np.int64), cast=False)],
                          "first_path", axis=1)[0]
        row_positions = g.op("Gather", ["position_ids", first_path], "row_positions", axis=1)[0]
    positions = g.op("Concat", [row_positions, g.op("Slice", [row_positions, last, end, axis1], "last_position")[0]],
                     "positions_padded", axis=1)[0]
    last_row = g.op("Slice", ["attention_mask", last, end, axis2], "mask_last_row")[0]  # [B, 1, 1, past + T]
    some_col = g.op("Slice", ["attention_mask", last, end, axis3], "mask_last_col")[0]
    hidden_col = g.op("Xor", [some_col, some_col], "mask_false_col")[0]  # [B, 1, T, 1]: all False
    rows = g.op("Concat", ["attention_mask", last_row], "mask_rows", axis=2)[0]  # [B, 1, T + 1, past + T]
    col = g.op("Concat", [hidden_col, g.op("Slice", [last_row, last, end, axis3], "mask_true_corner")[0]],
               "mask_extra_col", axis=2)[0]  # [B, 1, T + 1, 1]: False for real rows, True for the extra one
    mask = g.op("Concat", [rows, col], "mask_padded", axis=3)[0]  # [B, 1, T + 1, past + T + 1]
    width = g.op("Shape", [mask], "mask_width", start=3, end=4)[0]  # [1] = past + T + 1
    total = g.op("Cast", [g.op("Squeeze", [width], "total_i64")[0]], "total", to=TensorProto.INT32)[0]
    seqlens = g.op("Cast", [g.op("Sub", [width, one], "last_index")[0]], "seqlens_k", to=TensorProto.INT32)[0]
    zero = g.weight("zero", np.array(0.0))
    neg = g.weight("neg_inf", np.array(-np.inf))
    bias = g.op("Where", [mask, zero, neg], "attention_bias")[0]
    zero_i = g.weight("zero_i64", np.array([0], np.int64), cast=False)
    cos, sin = _rotary_cache(decoder, max_positions + 1, hd)  # + the extra row: GQA wants rows >= total
    cos, sin = g.weight("cos_cache", cos), g.weight("sin_cache", sin)

    split = g.weight("gate_up_split", np.array([cfg.intermediate_size] * 2, np.int64), cast=False)
    merge_paths = g.weight("merge_paths", np.array([0, 0, -1], np.int64), cast=False)
    pack_paths = g.weight("pack_paths", _packed_order(paths, nh * hd, kvh * hd), cast=False)
    x = g.op("Gather", [g.weight("embed_tokens", sd["model.embed_tokens.weight"]), "input_ids"], "embed", axis=0)[0]
    residual, pending = x, None  # pending: the last sub-layer's output, added to the residual by the next norm
    for i in range(n):
        p = f"model.layers.{i}."
        normed, residual = _norm(g, f"L{i}/input_norm", residual, pending, sd[p + "input_layernorm.weight"], eps)
        attn = p + "self_attn."
        qkv_w = np.concatenate([sd[attn + f"{k}_proj.weight"] for k in "qkv"], 0).T  # [H, (nh + 2 kvh) hd]
        qkv = g.op("MatMul", [normed, g.weight(f"L{i}/qkv.weight", qkv_w)], f"L{i}/qkv")[0]
        if attn + "q_proj.bias" in sd:
            qkv_b = np.concatenate([sd[attn + f"{k}_proj.bias"] for k in "qkv"], 0)
            qkv = g.op("Add", [qkv, g.weight(f"L{i}/qkv.bias", qkv_b)], f"L{i}/qkv_bias")[0]
        k_name, v_name = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        if paths > 1:
            qkv = g.op("Gather", [qkv, "path_rows"], f"L{i}/path_rows", axis=1)[0]  # [1, depths, paths, q|k|v]
        qkv = g.op("Concat", [qkv, g.op("Slice", [qkv, last, end, axis1], f"L{i}/qkv_last")[0]], f"L{i}/qkv_padded",
                   axis=1)[0]
        if paths > 1:  # packed [q | k | v] of heads grouped by path: head h of path b is head b * heads + h
            flat = g.op("Reshape", [qkv, merge_paths], f"L{i}/path_flat")[0]  # [1, depths + 1, paths * (q|k|v)]
            qkv = g.op("Gather", [flat, pack_paths], f"L{i}/path_heads", axis=2)[0]
        gqa = g.op("GroupQueryAttention", [qkv, "", "", k_name, v_name, seqlens, total, cos, sin, positions, bias],
                   f"L{i}/attention", outputs=3, domain=MS, num_heads=paths * nh, kv_num_heads=paths * kvh,
                   do_rotary=1)
        g.nodes[-1].output[1:] = [f"present.{i}.key", f"present.{i}.value"]
        attended = g.op("Slice", [gqa[0], zero_i, last, axis1], f"L{i}/attention_rows")[0]  # drop the extra row
        if paths > 1:  # [1, depths, paths * heads * hd] -> each node's row
            flat = g.op("Reshape", [attended, g.weight("path_out_shape", np.array([0, -1, nh * hd], np.int64),
                                                       cast=False)], f"L{i}/path_out")[0]
            attended = g.op("Gather", [flat, "node_rows"], f"L{i}/node_rows", axis=1)[0]
        out = g.op("MatMul", [attended, g.weight(f"L{i}/o.weight", sd[attn + "o_proj.weight"].T)], f"L{i}/o")[0]
        if attn + "o_proj.bias" in sd:
            out = g.op("Add", [out, g.weight(f"L{i}/o.bias", sd[attn + "o_proj.bias"])], f"L{i}/o_bias")[0]
        normed, residual = _norm(g, f"L{i}/post_norm", residual, out, sd[p + "post_attention_layernorm.weight"], eps)
        mlp = p + "mlp."
        gate_up_w = np.concatenate([sd[mlp + "gate_proj.weight"], sd[mlp + "up_proj.weight"]], 0).T
        gate_up = g.op("MatMul", [normed, g.weight(f"L{i}/gate_up.weight", gate_up_w)], f"L{i}/gate_up")[0]
        gate, up = g.op("Split", [gate_up, split], f"L{i}/split", outputs=2, axis=-1)
        silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"L{i}/sigmoid")[0]], f"L{i}/silu")[0]
        act = g.op("Mul", [silu, up], f"L{i}/act")[0]
        pending = g.op("MatMul", [act, g.weight(f"L{i}/down.weight", sd[mlp + "down_proj.weight"].T)], f"L{i}/down")[0]
    hidden, _ = _norm(g, "final_norm", residual, pending, sd["model.norm.weight"], eps)
    g.nodes.append(helper.make_node("Identity", [hidden], ["hidden"], name="hidden"))

    tensors = {t.name: t for t in io_table.inputs(n, io_table.HEAD_MAJOR_SHARED, paths)}
    kv_dims = SimpleNamespace(num_kv_heads=kvh, head_dim=hd)
    sym = lambda t: [t.fixed_sizes(kv_dims).get(i, a) for i, a in enumerate(t.axes)]  # noqa: E731 - symbolic stay names
    onnx_type = lambda t: helper.np_dtype_to_tensor_dtype(t.numpy_dtype(dtype))  # noqa: E731
    inputs = [helper.make_tensor_value_info(name, onnx_type(t), sym(t)) for name, t in tensors.items()
              if name != "temperature"]
    outputs = [helper.make_tensor_value_info("hidden", f, [io_table.BATCH, io_table.SEQ, cfg.hidden_size])]
    outputs += [helper.make_tensor_value_info(t.name, f, sym(t))
                for t in io_table.outputs(n, False, io_table.HEAD_MAJOR_SHARED, paths) if t.name.startswith("present.")]
    return helper.make_graph(g.nodes, "fused_backbone", inputs, outputs, g.inits)


def _packed_order(paths: int, q: int, kv: int) -> np.ndarray:
    """Columns of ``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]`` (one q|k|v block per path) in GroupQueryAttention's
    packed order ``[q_0 q_1 .. | k_0 k_1 .. | v_0 v_1 ..]``."""
    block = q + 2 * kv
    starts = np.arange(paths) * block
    parts = [(starts[:, None] + off + np.arange(n)).reshape(-1) for off, n in ((0, q), (q, kv), (q + kv, kv))]
    return np.concatenate(parts).astype(np.int64)


def _norm(g: _Graph, name: str, residual: str, pending: str | None, weight, eps: float) -> tuple[str, str]:
    """RMSNorm of ``residual + pending`` (the pending sub-layer output added here, fused); returns (normed, sum)."""
    w = g.weight(f"{name}.weight", weight)
    if pending is None:
        return g.op("SimplifiedLayerNormalization", [residual, w], name, epsilon=eps, axis=-1)[0], residual
    normed, total = f"{name}/out0", f"{name}/sum"
    g.nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [pending, residual, w], [normed, "", "", total],
                                    name=name, domain=MS, epsilon=eps))
    return normed, total
