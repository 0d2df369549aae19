"""Check an exported graph against PyTorch right after export, on random inputs at several shapes.

    report = validate_graph(step, "out/medusa.onnx", dtype="float32")   # raises ExportValidationError

Float outputs: max absolute error per output against a tolerance per dtype. Id outputs (top-k indices)
can legitimately differ where two logits are within rounding of each other, so they are compared as
the fraction of mismatching entries.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from medusa_export.runtime import io_table
from medusa_export.runtime.errors import ExportValidationError

from .onnx_export import dummy_inputs
from .step_model import StepModel

# (T, past): prefill-like, single token, tree-sized
SHAPES = ((7, 0), (1, 9), (12, 20))
TOLERANCE = {"float32": 1e-3, "float16": 5e-2}
MAX_ID_MISMATCH = 0.02


def validate_graph(step: StepModel, onnx_path, dtype: str = "float32", threads: int | None = None) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    names_in = [i.name for i in sess.get_inputs()]
    names_out = [o.name for o in sess.get_outputs()]
    torch_dtype = getattr(torch, io_table.model_dtype_of(dtype).name)
    # The reference runs in fp32 on the weights the graph holds: for a reduced-precision graph, a copy with
    # its weights rounded through that dtype (so this checks the export, not the rounding; the caller's model
    # is left as it is).
    ref_step = step if dtype == "float32" else copy.deepcopy(step).to(torch_dtype).float()
    worst: dict[str, float] = {}
    gen = torch.Generator().manual_seed(0)
    for t, past in SHAPES:
        torch.manual_seed(int(torch.randint(0, 1 << 30, (1,), generator=gen)))
        inputs = _single(dummy_inputs(ref_step, t=t, past=max(past, 2)), past)
        with torch.no_grad():
            ref = [r.float().numpy() if r.is_floating_point() else r.numpy() for r in ref_step(*inputs)]
        feed = {n: (v.to(torch_dtype) if v.is_floating_point() and n.startswith("past") else v).numpy()
                for n, v in zip(names_in, inputs)}
        got = sess.run(None, feed)
        for name, g, r in zip(names_out, got, ref):
            err = float(np.mean(g != r)) if r.dtype == np.int64 else float(np.abs(g.astype(np.float64) - r).max())
            worst[name] = max(worst.get(name, 0.0), err)
    _check(worst, dtype)
    return {"shapes": [list(s) for s in SHAPES], "max_abs_error": worst, "tolerance": TOLERANCE[dtype],
            "max_id_mismatch": MAX_ID_MISMATCH}


def _single(inputs: tuple, past: int) -> tuple:
    """Batch 1, and trim the past to ``past`` rows (0 allowed) keeping mask/positions consistent."""
    ids, pos, mask, temp, *kv = inputs
    t = ids.shape[1]
    keep = mask.shape[-1] - t
    kv = [k[:1, keep - past:] for k in kv]
    mask = mask[:1, :, :, keep - past:]
    return (ids[:1], pos[:1] - (keep - past), mask, temp, *kv)


def _check(worst: dict[str, float], dtype: str) -> None:
    ids = {o.name for o in io_table.outputs(1, True) if o.dtype == "int64"}
    for name, err in worst.items():
        limit = MAX_ID_MISMATCH if name in ids else TOLERANCE[dtype]
        if err > limit:
            raise ExportValidationError(
                f"exported graph output {name!r} differs from PyTorch by {err:.3g} (limit {limit:g}, {dtype}): "
                "the export is wrong; report it with the model type and versions"
            )
