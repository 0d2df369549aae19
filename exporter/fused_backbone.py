"""The decoder stack of a Llama-family model as an ONNX Runtime graph of fused operators, written directly from
the weights (no tracing): 14 nodes per layer (a chain graph) instead of the ~115 a traced graph keeps.

    graph = fused_backbone(hf_model.model, hf_model.config, max_positions=2048)   # GraphProto, output "hidden"

Per layer::

    SkipSimplifiedLayerNormalization (residual add + RMSNorm)
    MatMul (packed q|k|v) [+ Add bias]  ->  com.microsoft.GroupQueryAttention (rotary at position_ids,
                                              tree mask as attention_bias, KV written into the cache in place)
    MatMul (o)  ->  SkipSimplifiedLayerNormalization  ->  MatMul (packed gate|up) -> Split -> SiLU(gate)*up
    MatMul (down)

int8 graphs turn each of a layer's 4 matmul inputs per block first (``rotation``, `rotation.py`: a Reshape, an fp32
MatMul and a Reshape each), with the weights turned back.

A Medusa graph built with ``paths`` > 1 runs attention once per root-to-leaf path of the tree, each path a group
of heads on its own copy of the cache, so every node's numbers equal a one-token step's bit for bit
(runtime/tree_paths.py); the matmuls still run once per node.

``pad_rows``: every matmul runs on T + 1 rows, the extra one a copy of the last token's, dropped at the end of
the graph. ONNX Runtime's int4 ``MatMulNBits`` computes a one-row product with other arithmetic than a product
of several rows on AVX2 CPUs (measured: the same row differs in the last bits between M = 1 and M >= 2, while
its result is the same for every M >= 2), so without the extra row a one-token step and a tree node would
differ, and greedy Medusa would leave greedy vanilla. The build turns it on for int4 weights.

KV cache: head-major ``[batch, kv_heads, capacity, head_dim]`` buffers that are both ``past_key_values.*``
and ``present.*`` (ONNX Runtime's shared-buffer mode: GroupQueryAttention writes the T new rows at
``past`` in place when the two are bound to the same memory). ``seqlens_k`` / ``total_sequence_length``
come from the attention mask's width, so the graph's inputs are those of the portable graph.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from medusa_export.runtime import io_table, kernels
from medusa_export.runtime.errors import ModelError

from .model_checks import check_length_effects
from .rotation import SUFFIX, InputRotation

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


SILU_NAMES = ("silu", "swish")  # transformers' ACT2FN maps both to SiLU, which the graph writes as x * sigmoid(x)
PORTABLE_DTYPES = " (fp32 or fp16 weights: int8 and int4 need the fused graph)"


def check_supported(config, max_seq: int | None = None, attention: str | None = None, dtype: str = "fp32") -> None:
    """ModelError unless the fused builder covers this architecture exactly (else use the portable graph), and, with
    ``max_seq`` (the positions the graph holds), no sliding window takes effect within them (no graph implements
    one: `check_length_effects`; `Decoder` checks it with its own ``max_positions``). With ``attention``, the
    attention op takes the model's head size (`check_head_dim`; ``dtype``: the build's, for the fixes it names)."""
    if max_seq is not None:
        check_length_effects(config, max_seq)
    if attention is not None:
        check_head_dim(head_dim_of(config), attention, kernel_allowed=dtype != "fp16")
    problems = []
    if config.model_type not in ("llama", "mistral", "qwen2"):
        problems.append(f"model type {config.model_type!r}")
    if getattr(config, "hidden_act", "silu") not in SILU_NAMES:
        problems.append(f"activation {config.hidden_act!r}")
    if getattr(config, "mlp_bias", False):
        problems.append("MLP biases")
    if problems:
        raise ModelError(f"the fused ONNX Runtime graph does not cover {', '.join(problems)}: "
                         f"build with --graph portable{PORTABLE_DTYPES}")


# The head sizes each fused attention op takes: (multiple of, largest). ONNX Runtime's CPU GroupQueryAttention
# refuses a head size that is not a multiple of 16 at run time; the kernel's RowAttention takes multiples of 8 up to
# 256 (runtime/kernels/row_attention.c). Without this check the build failed in validation with a traceback.
HEAD_DIMS = {"gqa": (16, None), "kernel": (8, 256)}


def head_dim_of(config) -> int:
    """The attention head size transformers uses: ``head_dim`` when the config sets it, else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_head_dim(head_dim: int, attention: str, kernel_allowed: bool = True) -> None:
    """ModelError naming a fix when the fused graph's attention op (``attention``: gqa | kernel) cannot take heads of
    ``head_dim`` values; ``kernel_allowed`` False (fp16 weights, which the kernel does not take) leaves the kernel out
    of the fixes."""
    multiple, largest = HEAD_DIMS[attention]
    if head_dim % multiple == 0 and (largest is None or head_dim <= largest):
        return
    others = [f"--attention {a}" for a, (m, top) in HEAD_DIMS.items()
              if a != attention and (kernel_allowed or a != "kernel") and head_dim % m == 0
              and (top is None or head_dim <= top)]
    takes = f"multiples of {multiple}" + (f" up to {largest}" if largest else "")
    op = "ONNX Runtime's GroupQueryAttention" if attention == "gqa" else "the attention kernel"
    raise ModelError(f"the model's head size {head_dim} is not one {op} (--attention {attention}) takes ({takes}): "
                     f"build with {' or '.join([*others, '--graph portable' + PORTABLE_DTYPES])}")


def _rotary_cache(decoder, max_positions: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [max_positions, head_dim / 2] from the model's own rotary module (covers its scaling)."""
    import torch

    with torch.no_grad():
        pos = torch.arange(max_positions)[None]
        cos, sin = decoder.rotary_emb(torch.zeros(1, 1, head_dim, dtype=torch.float32), pos)
    cos, sin = cos[0].float().numpy(), sin[0].float().numpy()
    if cos.shape[-1] != head_dim:  # partial rotary frequencies: a shape error at the next line
        raise ModelError(f"the model's rotary embedding covers {cos.shape[-1]} of the {head_dim} values of a head "
                         f"(partial rotary), which its attention cannot apply: use partial_rotary_factor 1.0")
    if not (np.isfinite(cos).all() and np.isfinite(sin).all()):  # was refused as "not the rotate-half kind"
        raise ModelError("the model's rotary embedding gives NaN or infinite values (its rope_theta or RoPE scaling "
                         "overflows float32): restore the model's config.json")
    half = head_dim // 2
    if not (np.allclose(cos[:, :half], cos[:, half:]) and np.allclose(sin[:, :half], sin[:, half:])):
        raise ModelError("the model's rotary embedding is not the rotate-half kind: build with --graph portable")
    return cos[:, :half], sin[:, :half]


class Decoder:
    """The decoder stack's weights and the graph under construction; `layers` writes every layer around an
    attention block the caller supplies (one row set per step, or per lane)."""

    def __init__(self, decoder, cfg, max_positions: int, dtype: str, rotation: int = 0, attention: str = "gqa",
                 kv_dtype: str | None = None) -> None:
        """``rotation`` > 0: every decoder matmul's input turned per block of up to that many columns at run time,
        its weight the other way (`rotation`; for quantized graphs). ``attention`` "kernel": the project's
        RowAttention op (`runtime/kernels`) instead of GroupQueryAttention, same inputs and outputs.
        ``kv_dtype`` "float16" (kernel only): the K / V caches in fp16 (RowAttention16, LanesAttention16)."""
        check_supported(cfg, max_positions, attention)
        if kv_dtype not in (None, dtype) and (attention != "kernel" or kv_dtype != "float16"):
            raise ValueError(f"a {kv_dtype} KV cache in a {dtype} graph needs the attention kernel and float16")
        self.attention = attention
        self.kv_dtype = kv_dtype or dtype
        self.kv_half = self.kv_dtype != dtype  # the kernel's fp16-cache ops
        self.rotation = InputRotation(rotation) if rotation else None
        self.shared_constants: set[str] = set()  # names of the initializers `_constant` added
        self.np_dtype = io_table.model_dtype_of(dtype)
        self.cfg, self.dtype = cfg, dtype
        self.n, self.nh = cfg.num_hidden_layers, cfg.num_attention_heads
        self.kvh = getattr(cfg, "num_key_value_heads", None) or self.nh
        self.hd = head_dim_of(cfg)
        self.eps = float(cfg.rms_norm_eps)
        self.sd = {"model." + k: v.detach().float().numpy() for k, v in decoder.state_dict().items()}
        self.g = g = _Graph(self.np_dtype)
        self.f = helper.np_dtype_to_tensor_dtype(self.np_dtype)
        self.last = g.weight("last", np.array([-1], np.int64), cast=False)
        self.end = g.weight("end", np.array([np.iinfo(np.int64).max], np.int64), cast=False)
        self.one = g.weight("one_i64", np.array([1], np.int64), cast=False)
        self.zero_i = g.weight("zero_i64", np.array([0], np.int64), cast=False)
        self.axis1, self.axis2, self.axis3 = (g.weight(f"axis{a}", np.array([a], np.int64), cast=False)
                                              for a in (1, 2, 3))
        cos, sin = _rotary_cache(decoder, max_positions + 1, self.hd)  # + the extra row: GQA wants rows >= total
        self.cos, self.sin = g.weight("cos_cache", cos), g.weight("sin_cache", sin)

    def pad_last(self, x: str, name: str, axis: int = 1) -> str:
        """``x`` with a copy of its last entry along ``axis`` appended."""
        at = {1: self.axis1, 2: self.axis2, 3: self.axis3}[axis]
        tail = self.g.op("Slice", [x, self.last, self.end, at], f"{name}_last")[0]
        return self.g.op("Concat", [x, tail], f"{name}_padded", axis=axis)[0]

    def lengths(self, bias: str, name: str) -> tuple[str, str]:
        """GroupQueryAttention's seqlens_k and total_sequence_length from an additive bias' width."""
        g = self.g
        width = g.op("Shape", [bias], f"{name}/width", start=3, end=4)[0]  # [1] = past + rows
        total = g.op("Cast", [g.op("Squeeze", [width], f"{name}/total_i64")[0]], f"{name}/total", to=TensorProto.INT32)[0]
        seqlens = g.op("Cast", [g.op("Sub", [width, self.one], f"{name}/last_index")[0]], f"{name}/seqlens_k",
                       to=TensorProto.INT32)[0]
        return seqlens, total

    def project(self, x: str, w: np.ndarray, name: str) -> str:
        """``x @ w`` (w: [in, out]). With a rotation, x is turned per block by a MatMul named ``name`` +
        `rotation.SUFFIX` (quantization leaves it fp32) and w's rows are turned back: the same product in exact
        arithmetic."""
        block = self.rotation.block_of(w.shape[0]) if self.rotation else 1
        if block > 1:  # an odd width has no block to turn
            x = self._turn(x, w.shape[0], block, name)
            w = self.rotation.weight(w)
        return self.g.op("MatMul", [x, self.g.weight(f"{name}.weight", w)], name)[0]

    def _turn(self, x: str, width: int, block: int, name: str) -> str:
        """``x`` [batch, rows, width] with every block of its columns times the rotation matrix."""
        g = self.g
        matrix = self._constant(f"rotation{block}", self.rotation.matrix(block), cast=True)
        blocks = self._constant(f"rotation{block}/blocks{width}", np.array([0, 0, width // block, block], np.int64))
        rows = self._constant(f"rotation/width{width}", np.array([0, 0, width], np.int64))
        turned = g.op("MatMul", [g.op("Reshape", [x, blocks], f"{name}/rotation_in")[0], matrix], name + SUFFIX)[0]
        return g.op("Reshape", [turned, rows], f"{name}/rotation_out")[0]

    def _constant(self, name: str, value: np.ndarray, cast: bool = False) -> str:
        """An initializer shared by every layer, added at its first use."""
        if name not in self.shared_constants:
            self.shared_constants.add(name)
            self.g.weight(name, value, cast=cast)
        return name

    def gqa(self, name: str, qkv: str, k: str, v: str, seqlens: str, total: str, positions: str, bias: str,
            groups: int = 1) -> list[str]:
        """Attention over ``qkv`` rows whose last row is the extra row (see `fused_backbone`): GroupQueryAttention,
        or RowAttention, which computes each row by itself and skips the extra row."""
        heads = dict(num_heads=groups * self.nh, kv_num_heads=groups * self.kvh)
        if self.attention == "kernel":
            return self.g.op(kernels.row_op(self.kv_half), [qkv, k, v, seqlens, total, self.cos, self.sin, positions, bias], name,
                             outputs=3, domain=kernels.DOMAIN, skip_last_row=1, **heads)
        return self.g.op("GroupQueryAttention", [qkv, "", "", k, v, seqlens, total, self.cos, self.sin, positions, bias],
                         name, outputs=3, domain=MS, do_rotary=1, **heads)

    def embed(self, input_ids: str = "input_ids") -> str:
        return self.g.op("Gather", [self.g.weight("embed_tokens", self.sd["model.embed_tokens.weight"]), input_ids],
                         "embed", axis=0)[0]

    def layers(self, x: str, attention) -> str:
        """Every decoder layer on rows ``x``; ``attention(i, qkv)`` maps layer i's packed q|k|v rows to attended rows.
        Returns the final-normed hidden rows."""
        g, sd, cfg, eps = self.g, self.sd, self.cfg, self.eps
        split = g.weight("gate_up_split", np.array([cfg.intermediate_size] * 2, np.int64), cast=False)
        residual, pending = x, None  # pending: the last sub-layer's output, added to the residual by the next norm
        for i in range(self.n):
            p = f"model.layers.{i}."
            normed, residual = _norm(g, f"L{i}/input_norm", residual, pending, sd[p + "input_layernorm.weight"], eps)
            attn = p + "self_attn."
            qkv_w = np.concatenate([sd[attn + f"{k}_proj.weight"] for k in "qkv"], 0).T  # [H, (nh + 2 kvh) hd]
            qkv = self.project(normed, qkv_w, f"L{i}/qkv")
            if attn + "q_proj.bias" in sd:
                qkv_b = np.concatenate([sd[attn + f"{k}_proj.bias"] for k in "qkv"], 0)
                qkv = g.op("Add", [qkv, g.weight(f"L{i}/qkv.bias", qkv_b)], f"L{i}/qkv_bias")[0]
            attended = attention(i, qkv)
            out = self.project(attended, sd[attn + "o_proj.weight"].T, f"L{i}/o")
            if attn + "o_proj.bias" in sd:
                out = g.op("Add", [out, g.weight(f"L{i}/o.bias", sd[attn + "o_proj.bias"])], f"L{i}/o_bias")[0]
            normed, residual = _norm(g, f"L{i}/post_norm", residual, out, sd[p + "post_attention_layernorm.weight"], eps)
            mlp = p + "mlp."
            gate_up_w = np.concatenate([sd[mlp + "gate_proj.weight"], sd[mlp + "up_proj.weight"]], 0).T
            gate_up = self.project(normed, gate_up_w, f"L{i}/gate_up")
            gate, up = g.op("Split", [gate_up, split], f"L{i}/split", outputs=2, axis=-1)
            silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"L{i}/sigmoid")[0]], f"L{i}/silu")[0]
            act = g.op("Mul", [silu, up], f"L{i}/act")[0]
            pending = self.project(act, sd[mlp + "down_proj.weight"].T, f"L{i}/down")
        hidden, _ = _norm(g, "final_norm", residual, pending, sd["model.norm.weight"], eps)
        return hidden

    def value_info(self, tensor: io_table.Tensor):
        kv_dims = SimpleNamespace(num_kv_heads=self.kvh, head_dim=self.hd)
        shape = [tensor.fixed_sizes(kv_dims).get(i, a) for i, a in enumerate(tensor.axes)]  # symbolic stay names
        dtype = tensor.numpy_dtype(self.kv_dtype if tensor.kv else self.dtype)
        return helper.make_tensor_value_info(tensor.name, helper.np_dtype_to_tensor_dtype(dtype), shape)


def model_opsets(onnx_opset: int, attention: str) -> list:
    """A fused graph's opset imports: ONNX, com.microsoft and, with the attention kernel, its domain."""
    out = [helper.make_opsetid("", onnx_opset), helper.make_opsetid(MS, 1)]
    return out + [helper.make_opsetid(kernels.DOMAIN, 1)] if attention == "kernel" else out


def fused_backbone(decoder, cfg, max_positions: int, dtype: str = "float32", paths: int = 1, pad_rows: bool = False,
                   rotation: int = 0, attention: str = "gqa", kv_dtype: str | None = None):
    """GraphProto for ``decoder`` (a transformers ``*Model``: embeddings .. final norm) with config ``cfg``:
    inputs input_ids, position_ids, attention_mask, past_key_values.*; outputs hidden ([batch, seq, hidden],
    after the final norm) and present.*.

    ``paths`` > 1: attention runs per root-to-leaf path of the tree (runtime/tree_paths.py), each path a group
    of heads with its own copy of the KV cache (``[1, paths * kv_heads, capacity, head_dim]``); the step's
    attention rows are depths, mapped from and back to nodes by the inputs ``path_rows`` / ``node_rows``, and
    ``attention_mask`` is causal over those rows."""
    d = Decoder(decoder, cfg, max_positions, dtype, rotation, attention, kv_dtype)
    g, nh, kvh, hd = d.g, d.nh, d.kvh, d.hd
    # Per step, shared by every layer: the GQA lengths and the additive mask, for T + 1 query rows. ONNX Runtime's
    # GroupQueryAttention computes a one-row step with other arithmetic than a several-row step (last-bit
    # differences, which int8 activation quantization then amplifies). One extra row, a copy of the last, keeps
    # every step on the several-row path, so a tree node gets exactly the numbers a one-token step gets and greedy
    # Medusa stays token-for-token equal to greedy vanilla at every dtype. No real row sees the extra one (its key
    # column is masked); its KV row lands one past the step's rows and is overwritten later. The lanes graph
    # (`exporter/lanes_graph.py`) gives each sequence exactly these inputs, built on the host (`padded_bias`).
    row_positions = "position_ids"
    if paths > 1:  # the rows' positions: those of the longest path (path 0), one per depth
        first_path = g.op("Gather", ["path_rows", g.weight("zero_index", np.array(0, np.int64), cast=False)],
                          "first_path", axis=1)[0]
        row_positions = g.op("Gather", ["position_ids", first_path], "row_positions", axis=1)[0]
    positions = d.pad_last(row_positions, "positions")
    last_row = g.op("Slice", ["attention_mask", d.last, d.end, d.axis2], "mask_last_row")[0]  # [B, 1, 1, past + T]
    some_col = g.op("Slice", ["attention_mask", d.last, d.end, d.axis3], "mask_last_col")[0]
    hidden_col = g.op("Xor", [some_col, some_col], "mask_false_col")[0]  # [B, 1, T, 1]: all False
    rows = g.op("Concat", ["attention_mask", last_row], "mask_rows", axis=2)[0]  # [B, 1, T + 1, past + T]
    col = g.op("Concat", [hidden_col, g.op("Slice", [last_row, d.last, d.end, d.axis3], "mask_true_corner")[0]],
               "mask_extra_col", axis=2)[0]  # [B, 1, T + 1, 1]: False for real rows, True for the extra one
    mask = g.op("Concat", [rows, col], "mask_padded", axis=3)[0]  # [B, 1, T + 1, past + T + 1]
    bias = g.op("Where", [mask, g.weight("zero", np.array(0.0)), g.weight("neg_inf", np.array(-np.inf))],
                "attention_bias")[0]
    seqlens, total = d.lengths(bias, "step")
    merge_paths = g.weight("merge_paths", np.array([0, 0, -1], np.int64), cast=False)
    pack_paths = g.weight("pack_paths", _packed_order(paths, nh * hd, kvh * hd), cast=False)
    out_shape = g.weight("path_out_shape", np.array([0, -1, nh * hd], np.int64), cast=False)

    def attention(i: int, qkv: str) -> str:
        if paths > 1:
            qkv = g.op("Gather", [qkv, "path_rows"], f"L{i}/path_rows", axis=1)[0]  # [1, depths, paths, q|k|v]
        if paths > 1 or not pad_rows:  # attention's extra row (a padded step already has it)
            qkv = d.pad_last(qkv, f"L{i}/qkv")
        if paths > 1:  # packed [q | k | v] of heads grouped by path: head h of path b is head b * heads + h
            flat = g.op("Reshape", [qkv, merge_paths], f"L{i}/path_flat")[0]  # [1, depths + 1, paths * (q|k|v)]
            qkv = g.op("Gather", [flat, pack_paths], f"L{i}/path_heads", axis=2)[0]
        gqa = d.gqa(f"L{i}/attention", qkv, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens,
                    total, positions, bias, groups=paths)
        g.nodes[-1].output[1:] = [f"present.{i}.key", f"present.{i}.value"]
        if pad_rows and paths == 1:
            return gqa[0]
        attended = g.op("Slice", [gqa[0], d.zero_i, d.last, d.axis1], f"L{i}/attention_rows")[0]  # drop extra row
        if paths > 1:  # [1, depths, paths * heads * hd] -> each node's row
            flat = g.op("Reshape", [attended, out_shape], f"L{i}/path_out")[0]
            attended = g.op("Gather", [flat, "node_rows"], f"L{i}/node_rows", axis=1)[0]
            if pad_rows:
                attended = d.pad_last(attended, f"L{i}/out")
        return attended

    x = d.embed()
    if pad_rows:  # the extra row through every matmul (see the module docstring)
        x = d.pad_last(x, "embed")
    hidden = d.layers(x, attention)
    g.nodes.append(helper.make_node("Identity", [hidden], ["hidden"], name="hidden"))
    inputs = [d.value_info(t) for t in io_table.inputs(d.n, io_table.HEAD_MAJOR_SHARED, paths) if t.name != "temperature"]
    rows = "padded_rows" if pad_rows else io_table.SEQ
    outputs = [helper.make_tensor_value_info("hidden", d.f, [io_table.BATCH, rows, cfg.hidden_size])]
    outputs += [d.value_info(t) for t in io_table.outputs(d.n, False, io_table.HEAD_MAJOR_SHARED, paths)
                if t.name.startswith("present.")]
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
