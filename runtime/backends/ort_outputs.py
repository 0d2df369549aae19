"""The reduced outputs of an ONNX Runtime IOBinding run, read without wrapping every bound output."""

from __future__ import annotations

import numpy as np

from .. import io_table


def first_outputs(binding, n: int) -> list[np.ndarray]:
    """The first ``n`` outputs of ``binding`` (in the order they were first bound) as numpy arrays.

    `IOBinding.get_outputs()` wraps every bound output in a Python OrtValue, the KV buffers included: 64 for a
    one-sequence step of the default model (~70 µs), ~480 for an 8-lane step. The binding's native vector is
    indexed directly instead (~5 µs) when this ONNX Runtime exposes it."""
    native = getattr(binding, "_iobinding", None)
    values = native.get_outputs() if native is not None else binding.get_outputs()
    return [values[i].numpy() for i in range(n)]


_CPU = None  # the CPU device for the native binding, made once


def unbind_outputs(binding, names) -> None:
    """Bind ``names`` to the CPU, unallocated, so that ONNX Runtime allocates them at their next run's shapes (they
    change with the rows). Through the binding's native object where this ONNX Runtime exposes it: the Python
    wrapper makes a new device object per call (~20 µs each, five outputs a step, right after a step when the
    caches hold the weights)."""
    global _CPU
    native = getattr(binding, "_iobinding", None)
    if native is None:
        for name in names:
            binding.bind_output(name, "cpu")
        return
    if _CPU is None:
        from onnxruntime.capi.onnxruntime_inference_collection import OrtDevice

        _CPU = OrtDevice.make("cpu", 0)._get_c_device()
    bound = getattr(binding, "_bound_outputs", {})  # what the wrapper records of a bound output (ORT >= 1.2x)
    for name in names:
        native.bind_output(name, _CPU)
        bound[name] = None


def selects_rows(session) -> bool:
    """Whether a graph runs lm_head and the reductions on the rows asked only (`io_table.row_selection_input`;
    graphs built before it compute every row)."""
    return any(i.name == io_table.row_selection_input().name for i in session.get_inputs())
