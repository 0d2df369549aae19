"""Trace `StepModel` (backbone + fused heads, or backbone alone) into ONNX.

    export_step_graph(step, "out/medusa.onnx", dtype="float32")

One graph serves prefill (T = prompt length) and tree verification (T = tree size): every length is a
symbolic axis (``batch_size``, ``sequence_length``, ``past_sequence_length``, ``total_sequence_length``).
Weights go to an external-data file (``<name>.onnx.data``) when the model is over 2 GB, else inline.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from medusa_export.runtime import io_table

from .step_model import StepModel

TWO_GB = 2 * 1024**3
OPSET = 17


def dummy_inputs(step: StepModel, t: int = 3, past: int = 2, dtype=torch.float32) -> tuple:
    """Example inputs with every dynamic size >= 2 (sizes 0/1 would be specialised by tracing)."""
    cfg = step.config
    kvh = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    ids = torch.randint(0, cfg.vocab_size, (2, t))
    pos = torch.arange(past, past + t).repeat(2, 1)
    mask = torch.ones(2, 1, t, past + t, dtype=torch.bool)
    mask[:, :, :, past:] = torch.tril(torch.ones(t, t, dtype=torch.bool))
    temp = torch.ones(1)
    kv = [torch.randn(2, past, kvh, hd, dtype=dtype) * 0.1 for _ in range(2 * cfg.num_hidden_layers)]
    return (ids, pos, mask, temp, *kv)


def dynamic_axes(num_layers: int, medusa: bool) -> dict[str, dict[int, str]]:
    axes = {}
    for t in io_table.inputs(num_layers) + io_table.outputs(num_layers, medusa):
        named = {i: a for i, a in enumerate(t.axes) if a in (io_table.BATCH, io_table.SEQ, io_table.PAST, io_table.TOTAL)}
        if named:
            axes[t.name] = named
    return axes


def export_step_graph(step: StepModel, path: str | Path, dtype: str = "float32") -> Path:
    """Export to ``path`` (an .onnx file); returns it. The caller validates the result."""
    path = Path(path)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16}[dtype]
    step = step.to(torch_dtype).eval()
    n = step.num_layers
    medusa = step.heads is not None
    size = sum(p.numel() * p.element_size() for p in step.parameters())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            step,
            dummy_inputs(step, dtype=torch_dtype),
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
