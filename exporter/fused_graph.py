"""The ONNX Runtime-targeted step graph: the hand-built fused decoder stack (`fused_backbone`) followed by the
traced reduction tail (lm_head, top-k, probabilities, entropy, Medusa heads: `step_model.ReducedTail`).

    export_fused_graph(step, "out/medusa.onnx", dtype="float32", max_positions=2048)

Same inputs and reduced outputs as the portable graph (`onnx_export`), but a head-major shared KV cache
(``io_table.HEAD_MAJOR_SHARED``) and com.microsoft operators, so only ONNX Runtime runs it; TensorRT parses
the portable graph.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from onnx import helper

from medusa_export.runtime import io_table

from .fused_backbone import fused_backbone, model_opsets
from .onnx_export import OPSET, TWO_GB
from .step_model import ReducedTail, StepModel


def export_fused_graph(step: StepModel, path: str | Path, dtype: str = "float32", max_positions: int = 2048,
                       paths: int = 1, min_rows: int = 1, rotation: int = 0, attention: str = "gqa",
                       kv_dtype: str | None = None) -> Path:
    """``paths`` > 1: attention per root-to-leaf path of trees of up to that many paths (exact verification,
    see `fused_backbone`). ``min_rows`` 2: every matmul runs on at least two rows (see `fused_backbone`).
    ``rotation`` > 0: the decoder's matmul inputs turned per block (`rotation`), for quantized graphs.
    ``attention`` "kernel": RowAttention (`runtime/kernels`) instead of GroupQueryAttention."""
    path = Path(path)
    medusa = step.heads is not None
    backbone = fused_backbone(step.backbone, step.config, max_positions, dtype, paths, pad_rows=min_rows > 1,
                              rotation=rotation, attention=attention, kv_dtype=kv_dtype)
    tail = _export_tail(step, dtype, padded=min_rows > 1)
    graph = _append_tail(select_output_rows(backbone, padded=min_rows > 1), tail.graph, medusa, step.num_layers, paths)
    model = helper.make_model(graph, opset_imports=model_opsets(OPSET, attention), producer_name="medusa-export")
    model.ir_version = tail.ir_version
    return save_graph(model, path)


def save_graph(model: onnx.ModelProto, path: Path) -> Path:
    """Weights inline, or beside the graph in ``<name>.data`` past protobuf's 2 GB. No onnx.checker here: it rejects
    ONNX Runtime's own operators; ONNX Runtime loads the graph and `validate` compares it with PyTorch."""
    if sum(t.ByteSize() for t in model.graph.initializer) > TWO_GB:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")
    else:
        onnx.save_model(model, str(path))
    return path


def _export_tail(step: StepModel, dtype: str, padded: bool = False) -> onnx.ModelProto:
    """Trace hidden -> reduced outputs (lm_head, reduction, heads) at the graph's dtype (``padded``: hidden has one
    extra last row, projected and then dropped)."""
    torch_dtype = getattr(torch, io_table.model_dtype_of(dtype).name)
    if any(p.dtype != torch_dtype for p in step.parameters()):
        step = copy.deepcopy(step).to(torch_dtype)  # never the caller's model
    tail = ReducedTail(step.eval(), padded)
    names = io_table.reduced_names(step.heads is not None)
    hidden = torch.randn(2, 3 + padded, step.config.hidden_size, dtype=torch_dtype)  # sizes >= 2: not specialised
    ids = torch.randint(0, step.config.vocab_size, (2, 3))
    rows = "padded_rows" if padded else io_table.SEQ  # hidden's rows: T, or T + 1 with the extra row
    axes = {"hidden": {0: io_table.BATCH, 1: rows}, "input_ids": {0: io_table.BATCH, 1: io_table.SEQ}}
    for t in io_table.reduced_outputs(step.heads is not None):
        axes[t.name] = {i: a for i, a in enumerate(t.axes) if io_table.is_symbolic(a)}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = Path(tmp) / "tail.onnx"
        torch.onnx.export(tail, (hidden, ids, torch.ones(1)), str(out), input_names=["hidden", "input_ids", "temperature"],
                          output_names=names, dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True,
                          dynamo=False)
        return onnx.load(str(out))


def select_output_rows(backbone: onnx.GraphProto, padded: bool) -> onnx.GraphProto:
    """The backbone with its ``hidden`` cut to the rows of the input ``output_rows`` (`io_table.row_selection_input`):
    the tail after it (lm_head, reductions, heads: a fifth of a prefill's time, more with heads) then runs on the
    rows decoding reads, not on every prompt row. ``padded``: the backbone's extra last row follows the selected
    ones, so the tail's matmuls still see at least two rows (see `fused_backbone`)."""
    backbone = copy.deepcopy(backbone)
    last = next(n for n in backbone.node if n.name == "hidden")
    last.output[0] = "hidden_all"
    selected = "hidden_selected" if padded else "hidden"
    nodes = [helper.make_node("Gather", ["hidden_all", "output_rows"], [selected], name="output_rows/gather", axis=1)]
    if padded:
        backbone.initializer.extend([onnx.numpy_helper.from_array(np.array([v], np.int64), name) for name, v in
                                     (("output_rows/minus_one", -1), ("output_rows/end", np.iinfo(np.int64).max),
                                      ("output_rows/axis", 1))])
        nodes += [helper.make_node("Slice", ["hidden_all", "output_rows/minus_one", "output_rows/end", "output_rows/axis"],
                                   ["hidden_extra"], name="output_rows/extra_row"),
                  helper.make_node("Concat", ["hidden_selected", "hidden_extra"], ["hidden"], name="output_rows/rows",
                                   axis=1)]
    backbone.node.extend(nodes)
    t = io_table.row_selection_input()
    backbone.input.append(helper.make_tensor_value_info(t.name, onnx.TensorProto.INT64, list(t.axes)))
    return backbone


def _append_tail(backbone: onnx.GraphProto, tail: onnx.GraphProto, medusa: bool, num_layers: int,
                 paths: int) -> onnx.GraphProto:
    """One graph: the backbone's nodes, then the tail's; the tail reads the backbone's ``hidden`` and the shared
    ``input_ids`` / ``temperature`` inputs."""
    merged = _append_tail_nodes(backbone, tail, {"hidden", "input_ids", "temperature", *io_table.reduced_names(medusa)})
    temperature = next(i for i in tail.input if i.name == "temperature")
    table = {t.name: i for i, t in enumerate([*io_table.inputs(num_layers, io_table.HEAD_MAJOR_SHARED, paths),
                                              io_table.row_selection_input()])}
    inputs = sorted([*backbone.input, temperature], key=lambda i: table[i.name])  # output_rows last
    presents = [o for o in backbone.output if o.name.startswith("present.")]
    return helper.make_graph(list(merged.node), "medusa_export_fused", inputs, list(tail.output) + presents,
                             list(merged.initializer))


def _append_tail_nodes(backbone: onnx.GraphProto, tail: onnx.GraphProto, shared: set[str]) -> onnx.GraphProto:
    """The backbone's nodes and initializers, then the tail's with their internal names prefixed (no collisions);
    names in ``shared`` connect the two. Inputs and outputs are the caller's to set."""
    shared = shared | {""}
    rename = lambda name: name if name in shared else f"tail/{name}"  # noqa: E731
    nodes = list(backbone.node)
    for node in tail.node:
        node = copy.deepcopy(node)
        node.input[:] = [rename(x) for x in node.input]
        node.output[:] = [rename(x) for x in node.output]
        node.name = rename(node.name)
        nodes.append(node)
    inits = list(backbone.initializer)
    for init in tail.initializer:
        init = copy.deepcopy(init)
        init.name = rename(init.name)
        inits.append(init)
    return helper.make_graph(nodes, "merged", [], [], inits)
