"""The lanes graph: one ONNX Runtime step for several sequences at once, each answer exactly what it would be
alone.

    export_lanes_graph(step, "out/lanes.onnx", lanes=8, dtype="float32", max_positions=2048)

Every matmul runs once over the rows of all lanes back to back (a prefill chunk, or one token per decoding
sequence); only attention runs per lane, as one GroupQueryAttention call on that sequence's own KV buffers with
exactly the inputs a one-sequence step gives it (its rows plus the extra row, positions, additive bias: built on
the host by `runtime.lanes`). ONNX Runtime's GroupQueryAttention refuses more than one new row per sequence with a
past at batch > 1, and a batched one-row call computes with other arithmetic than the several-row call a
one-sequence step makes; one call per lane keeps both facts harmless. Matmuls, norms and the vocabulary
reduction compute each row independently of the others (checked by tests on every weight dtype), so a row's
numbers do not depend on what shares the step.

Per layer the lanes cost one Gather and one Split (each lane's rows and extra row, by host-built indices), one
GroupQueryAttention each, and a Concat and Gather back: a few nodes, not a few per lane. A lane with no rows
(fewer sequences than lanes) costs no matmul row: its attention runs on one zero row against a scratch buffer the
runtime binds, and its output is dropped.

Built with ``--attention kernel``, a layer's attention is one LanesAttention call (`runtime/kernels`) on the rows as
they are: it takes every lane's positions, bias and KV buffers at once, computes each lane's rows exactly as
RowAttention computes them in the one-sequence graph, and spreads (lane, head) work over the threads. No Gather,
Split or Concat, and no ``lane_gather`` / ``row_gather`` inputs.

The tail (lm_head, reductions) runs on the rows named by ``output_rows`` (`io_table.row_selection_input`): a prompt
chunk needs at most its last row's.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper

from medusa_export.runtime import io_table, kernels

from .fused_backbone import Decoder, model_opsets
from .fused_graph import _append_tail_nodes, save_graph, select_output_rows
from .onnx_export import OPSET
from .step_model import LanesTail, StepModel


def lanes_backbone(decoder, cfg, max_positions: int, dtype: str, lanes: int, rotation: int = 0,
                   attention: str = "gqa", kv_dtype: str | None = None) -> onnx.GraphProto:
    d = Decoder(decoder, cfg, max_positions, dtype, rotation, attention, kv_dtype)
    g = d.g
    past = [io_table.lane_kv_names(d.n, b, "past_key_values") for b in range(lanes)]
    present = [io_table.lane_kv_names(d.n, b, "present") for b in range(lanes)]
    kv = lambda names, i, b: names[b][2 * i:2 * i + 2]  # noqa: E731 (lane b's key and value of layer i)

    def kernel_attention(i: int, qkv: str) -> str:
        # One LanesAttention call per layer on the rows as they are, lane by lane: each lane's rows computed as
        # RowAttention computes them alone (the lane's extra row in its positions and bias is not read).
        per_lane = [x for b in range(lanes) for x in (f"position_ids.{b}", f"attention_bias.{b}", *kv(past, i, b))]
        outs = g.op(kernels.lanes_op(d.kv_half), [qkv, "lane_sizes", d.cos, d.sin, *per_lane], f"L{i}/attention",
                    outputs=1 + 2 * lanes, domain=kernels.DOMAIN, num_heads=d.nh, kv_num_heads=d.kvh)
        g.nodes[-1].output[1:] = [x for b in range(lanes) for x in kv(present, i, b)]
        return outs[0]

    if attention == "kernel":
        hidden = d.layers(d.embed(), kernel_attention)
        return _lanes_graph(d, hidden, lanes, gathers=False)

    width = (d.nh + 2 * d.kvh) * d.hd
    zero_row = g.weight("zero_row", np.zeros((1, 1, width)))  # what an empty lane's attention reads
    lengths = [d.lengths(f"attention_bias.{b}", f"lane{b}") for b in range(lanes)]  # shared by every layer

    def attention(i: int, qkv: str) -> str:
        # Every lane's rows plus its extra row, in lane order (host-built indices into [zero row; rows]), split
        # into one GroupQueryAttention input per lane; the real rows of the outputs gathered back in row order.
        rows = g.op("Concat", [zero_row, qkv], f"L{i}/with_zero", axis=1)[0]
        padded = g.op("Gather", [rows, "lane_gather"], f"L{i}/lane_rows", axis=1)[0]
        per_lane = g.op("Split", [padded, "lane_sizes"], f"L{i}/lanes", outputs=lanes, axis=1)
        outs = []
        for b, (seqlens, total) in enumerate(lengths):
            gqa = d.gqa(f"L{i}/lane{b}/attention", per_lane[b], *kv(past, i, b), seqlens, total,
                        f"position_ids.{b}", f"attention_bias.{b}")
            g.nodes[-1].output[1:] = kv(present, i, b)
            outs.append(gqa[0])
        attended = g.op("Concat", outs, f"L{i}/lanes_out", axis=1)[0]
        return g.op("Gather", [attended, "row_gather"], f"L{i}/rows_out", axis=1)[0]

    return _lanes_graph(d, d.layers(d.embed(), attention), lanes)


def _lanes_graph(d: Decoder, hidden: str, lanes: int, gathers: bool = True) -> onnx.GraphProto:
    """The backbone graph around ``hidden`` (``gathers``: whether it reads ``lane_gather`` and ``row_gather``)."""
    g, cfg = d.g, d.cfg
    g.nodes.append(helper.make_node("Identity", [hidden], ["hidden"], name="hidden"))
    inputs = [d.value_info(t) for t in io_table.lanes_inputs(d.n, lanes, gathers) if t.name != "row_temperature"]
    outputs = [helper.make_tensor_value_info("hidden", d.f, [io_table.BATCH, io_table.ROWS, cfg.hidden_size])]
    outputs += [d.value_info(t) for t in io_table.lanes_outputs(d.n, lanes) if t.name.startswith("present.")]
    return helper.make_graph(g.nodes, "lanes_backbone", inputs, outputs, g.inits)


def export_lanes_graph(step: StepModel, path: str | Path, lanes: int, dtype: str = "float32",
                       max_positions: int = 2048, rotation: int = 0, attention: str = "gqa",
                       kv_dtype: str | None = None) -> Path:
    path = Path(path)
    # The tail (lm_head, reductions) runs on the rows the host asks for: a prompt chunk's last row or none.
    backbone = select_output_rows(lanes_backbone(step.backbone, step.config, max_positions, dtype, lanes, rotation,
                                                 attention, kv_dtype), padded=False)
    tail = _export_tail(step, dtype)
    graph = _append_tail_nodes(backbone, tail.graph, shared={"hidden", "row_temperature",
                                                              *(t.name for t in io_table.lanes_reduced_outputs())})
    table = {t.name: i for i, t in enumerate([*io_table.lanes_inputs(step.num_layers, lanes),
                                              io_table.row_selection_input()])}
    temperature = next(i for i in tail.graph.input if i.name == "row_temperature")
    inputs = sorted([*backbone.input, temperature], key=lambda i: table[i.name])  # output_rows last
    presents = [o for o in backbone.output if o.name.startswith("present.")]
    graph = helper.make_graph(list(graph.node), "medusa_export_lanes", inputs, list(tail.graph.output) + presents,
                              list(graph.initializer))
    model = helper.make_model(graph, opset_imports=model_opsets(OPSET, attention), producer_name="medusa-export")
    model.ir_version = tail.ir_version
    return save_graph(model, path)


def _export_tail(step: StepModel, dtype: str) -> onnx.ModelProto:
    torch_dtype = getattr(torch, io_table.model_dtype_of(dtype).name)
    if any(p.dtype != torch_dtype for p in step.parameters()):
        step = copy.deepcopy(step).to(torch_dtype)  # never the caller's model
    names = [t.name for t in io_table.lanes_reduced_outputs()]
    hidden = torch.randn(1, 3, step.config.hidden_size, dtype=torch_dtype)  # sizes >= 2: not specialised
    axes = {"hidden": {0: io_table.BATCH, 1: io_table.ROWS}, "row_temperature": {0: io_table.BATCH, 1: io_table.ROWS}}
    for t in io_table.lanes_outputs(step.num_layers, 0):
        axes[t.name] = {i: a for i, a in enumerate(t.axes) if io_table.is_symbolic(a)}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = Path(tmp) / "tail.onnx"
        torch.onnx.export(LanesTail(step.eval()), (hidden, torch.ones(1, 3)), str(out),
                          input_names=["hidden", "row_temperature"], output_names=names, dynamic_axes=axes,
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
        return onnx.load(str(out))
