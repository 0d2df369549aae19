"""Reading an ONNX Runtime IOBinding's outputs (`runtime/backends/ort_outputs.py`), on a three-node graph."""

from __future__ import annotations

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from onnx import TensorProto, helper  # noqa: E402

from medusa_export.runtime.backends.ort_outputs import first_outputs  # noqa: E402


def test_first_outputs_reads_the_bound_outputs_in_binding_order():
    nodes = [helper.make_node("Neg", ["x"], ["a"]), helper.make_node("Abs", ["x"], ["b"]),
             helper.make_node("Identity", ["x"], ["c"])]
    info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3]) for n in "xabc"]
    model = helper.make_model(helper.make_graph(nodes, "g", info[:1], info[1:]),
                              opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    x = np.array([1.0, -2.0, 3.0], np.float32)
    binding.bind_cpu_input("x", x)
    for name in ("b", "a", "c"):  # the order of first binding, not the graph's
        binding.bind_output(name, "cpu")
    session.run_with_iobinding(binding)
    native = first_outputs(binding, 2)

    class PublicOnly:  # an IOBinding without the native vector: the public API is used
        def get_outputs(self):
            return binding.get_outputs()

    for got in (native, first_outputs(PublicOnly(), 2)):
        assert len(got) == 2
        np.testing.assert_array_equal(got[0], np.abs(x))
        np.testing.assert_array_equal(got[1], -x)
