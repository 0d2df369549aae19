"""A tied embedding read from the lm_head's quantized weights (`exporter/quantized_embedding.py`)."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

V, H = 96, 64


def _graph(path, embedding: np.ndarray, lm_head: np.ndarray) -> None:
    """ids -> Gather(embedding) -> MatMul(lm_head^T): what an exported step graph does at its two ends."""
    nodes = [helper.make_node("Gather", ["embed_tokens", "ids"], ["h"], name="embed"),
             helper.make_node("MatMul", ["h", "lm_head_t"], ["logits"], name="lm_head")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, V])],
                              [numpy_helper.from_array(embedding, "embed_tokens"),
                               numpy_helper.from_array(np.ascontiguousarray(lm_head.T), "lm_head_t")])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_a_tied_embedding_gathers_the_lm_heads_quantized_rows(tmp_path, dtype):
    from medusa_export.exporter.quantize import RECIPES, quantize_graph

    rng = np.random.default_rng(0)
    table = rng.standard_normal((V, H)).astype(np.float32)
    path = tmp_path / "g.onnx"
    _graph(path, table, table)
    record = quantize_graph(path, dtype)
    assert record["embedding"] == "GatherBlockQuantized on the lm_head's weights"
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node] == ["GatherBlockQuantized", "MatMulNBits"]
    assert "embed_tokens" not in {t.name for t in model.graph.initializer}  # the fp32 table is gone
    ids = np.arange(V)
    rows = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    # Each logit row is the quantized lm_head applied to a dequantized embedding row: close to fp32's table @ table^T.
    exact = table @ table.T
    step = {"int8": 0.05, "int4": 0.8}[dtype] * np.abs(exact).max()
    assert np.abs(rows - exact).max() < step and RECIPES[dtype]["bits"] in (4, 8)


def test_an_untied_lm_head_leaves_the_embedding_alone(tmp_path):
    from medusa_export.exporter.quantize import quantize_graph

    rng = np.random.default_rng(1)
    path = tmp_path / "g.onnx"
    _graph(path, rng.standard_normal((V, H)).astype(np.float32), rng.standard_normal((V, H)).astype(np.float32))
    assert quantize_graph(path, "int8")["embedding"] == "fp32"
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node] == ["Gather", "MatMulNBits"]
