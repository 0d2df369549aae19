"""scripts/outside_products.py: a graph of a step's product nodes alone, fed what the step fed them, computes what
the step computed (so timing it times the step's products); its two families split where they say."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import build_tiny, load_script

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def script():
    return load_script("outside_products")


@pytest.fixture(scope="module")
def rows_artifact(tiny_dirs, tmp_path_factory):
    """int8 rows with the attention kernel and the screened lm_head: RowQuantize, MatMulInteger, ScaleRows and
    ScreenedVocab in one graph."""
    return build_tiny(tiny_dirs, tmp_path_factory.mktemp("outside") / "int8-rows", dtype="int8", max_seq=64,
                      attention="kernel", int8_matmul="rows")


def _loaded(rows_artifact):
    from medusa_export.runtime.api import MedusaRuntime

    rt = MedusaRuntime.load(rows_artifact, backend="ort", threads=1)
    model = onnx.load(str(rows_artifact / rt.manifest.graphs["vanilla"].file))
    return rt, model


def test_families_split_at_the_row_quantization(script, rows_artifact):
    rt, model = _loaded(rows_artifact)
    rt.close()
    ops = {n.output[0]: n.op_type for n in model.graph.node}
    p_in, p_out = script.boundary(model.graph, script.FAMILIES["products"])
    m_in, m_out = script.boundary(model.graph, script.FAMILIES["matmuls"])
    assert {ops.get(n) for n in p_in} & {"RowQuantize", "ScaleRows", "MatMulInteger"} == set()
    assert "RowQuantize" in {ops.get(n) for n in m_in}  # the quantized rows come in from outside
    assert "MatMulInteger" in {ops.get(n) for n in m_out}  # the int32 sums go out to ScaleRows
    assert "next_token_ids" in p_out and "next_token_ids" in m_out  # ScreenedVocab is in both


def test_each_family_graph_recomputes_the_steps_values(script, rows_artifact):
    rt, model = _loaded(rows_artifact)
    backend = rt.generator.backend
    backend.graph("vanilla")
    for kind, family in script.FAMILIES.items():
        inputs, outputs = script.boundary(model.graph, family)
        values = script.capture(backend, model, inputs + outputs, 7)
        graph = script.session(backend, script.family_model(model, family, inputs, outputs, values))
        got = graph.run(outputs, {n: values[n] for n in inputs})
        assert len(outputs) > 3
        for name, value in zip(outputs, got):
            np.testing.assert_array_equal(value, values[name], err_msg=f"{kind}: {name}")
    rt.close()


def test_measure_reports_both_shares(script, rows_artifact):
    row = script.measure(rows_artifact, past=5, blocks=2, steps=2, threads=1)
    assert set(row["p50_ms"]) == {"step", "products", "matmuls"}
    assert set(row["outside_share"]) == set(script.FAMILIES)
    assert all(v > 0 for v in row["p50_ms"].values())
