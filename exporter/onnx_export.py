"""Trace `StepModel` (backbone + fused heads, or backbone alone) into ONNX.

    export_step_graph(step, "out/medusa.onnx", dtype="float32")

One graph serves prefill (T = prompt length) and tree verification (T = tree size): every length is a
symbolic axis (``batch_size``, ``sequence_length``, ``past_sequence_length``, ``total_sequence_length``).
Weights go to an external-data file (``<name>.onnx.data``) when the model is over 2 GB, else inline.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from medusa_export.runtime import io_table

from .step_model import StepModel
from .torch_backend import model_dims

TWO_GB = 2 * 1024**3
OPSET = 17


def dummy_inputs(step: StepModel, t: int = 3, past: int = 2, dtype: str = "float32", batch: int = 2) -> tuple:
    """Example inputs in I/O-table order and shapes, every dynamic size >= 2 by default (sizes 0/1 would be
    specialised by tracing): random ids, positions after ``past``, a causal mask, random KV rows."""
    dims = model_dims(step.config, step.heads, step.head_topk, step.sample_topk, dtype=dtype)
    sizes = {io_table.BATCH: batch, io_table.SEQ: t, io_table.PAST: past, io_table.TOTAL: past + t}
    example = {
        "input_ids": lambda shape: torch.randint(0, dims.vocab_size, shape),
        "position_ids": lambda shape: torch.arange(past, past + t).repeat(batch, 1),
        "attention_mask": lambda shape: torch.cat([torch.ones(batch, 1, t, past, dtype=torch.bool),
                                                   torch.ones(t, t, dtype=torch.bool).tril().expand(batch, 1, t, t)], -1),
        "temperature": lambda shape: torch.ones(shape),
    }
    out = []
    for tensor in io_table.inputs(dims.num_layers):
        shape = tensor.shape(dims, sizes)
        make = example.get(tensor.name) or (lambda s: torch.randn(s) * 0.1)  # the KV cache
        value = make(shape)
        out.append(value.to(getattr(torch, tensor.numpy_dtype(dtype).name)))
    return tuple(out)


def dynamic_axes(num_layers: int, medusa: bool) -> dict[str, dict[int, str]]:
    axes = {}
    for t in io_table.inputs(num_layers) + io_table.outputs(num_layers, medusa):
        named = {i: a for i, a in enumerate(t.axes) if a in io_table.SYMBOLIC}
        if named:
            axes[t.name] = named
    return axes


def export_step_graph(step: StepModel, path: str | Path, dtype: str = "float32") -> Path:
    """Export to ``path`` (an .onnx file); returns it. The caller validates the result. The caller's model
    is never changed: a reduced-precision export casts a copy."""
    path = Path(path)
    torch_dtype = getattr(torch, io_table.model_dtype_of(dtype).name)
    if any(p.dtype != torch_dtype for p in step.parameters()):
        step = copy.deepcopy(step).to(torch_dtype)
    step = step.eval()
    n = step.num_layers
    medusa = step.heads is not None
    size = sum(p.numel() * p.element_size() for p in step.parameters())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            step,
            dummy_inputs(step, dtype=dtype),
            str(path),
            input_names=io_table.input_names(n),
            output_names=io_table.output_names(n, medusa),
            dynamic_axes=dynamic_axes(n, medusa),
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    import onnx

    model = onnx.load(str(path))
    if size > TWO_GB:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")
    onnx.checker.check_model(str(path))
    return path
