"""scripts/exactness_cost.py: the timing-only variants of a vanilla graph are the graph minus exactly what they
name (the extra query row; the int8 input rotations) and still run; without the extra row a one-token step
computes the same function up to the last bits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import build_tiny, load_script

from medusa_export.runtime.manifest import Manifest

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def cost():
    return load_script("exactness_cost")


@pytest.fixture(scope="module")
def int8_artifact(tiny_dirs, tmp_path_factory):
    return build_tiny(tiny_dirs, tmp_path_factory.mktemp("cost") / "int8", dtype="int8", max_seq=64)


def _graph(artifact: Path) -> tuple[Manifest, Path]:
    manifest = Manifest.read(artifact)
    return manifest, artifact / manifest.graphs["vanilla"].file


def _ops(model_bytes: bytes) -> list[onnx.NodeProto]:
    return list(onnx.load_from_string(model_bytes).graph.node)


def test_without_the_extra_row_attention_reads_the_steps_own_rows(cost, artifact):
    manifest, path = _graph(artifact)
    graphs = cost.variants(path)
    assert set(graphs) == {"as built", "without extra row"}  # fp32: no rotation to remove
    before, after = _ops(graphs["as built"]), _ops(graphs["without extra row"])
    layers = manifest.dims.num_layers
    assert sum(n.op_type == "GroupQueryAttention" for n in after) == layers
    # per layer the row's Slice and Concat before attention and the Slice after it; shared by the layers, the
    # padded positions (a Slice and a Concat) and the padded mask (seven nodes) went with them
    assert len(before) - len(after) == 3 * layers + 9
    assert not [n.name for n in after if "padded" in n.name or n.name.endswith("/attention_rows")]
    producers = {o: n for n in after for o in n.output}
    for gqa in (n for n in after if n.op_type == "GroupQueryAttention"):
        assert producers[gqa.input[0]].op_type == "MatMul"  # the packed q|k|v projection itself


def test_without_the_extra_row_a_one_token_step_computes_the_same_function(cost, artifact):
    manifest, path = _graph(artifact)
    graphs = cost.variants(path)
    loops = [cost.BareLoop(graphs[name], manifest, threads=1) for name in ("as built", "without extra row")]
    for past, token in ((0, 3), (1, 7), (2, 11), (3, 5)):  # the same KV buffers (one seed) and tokens
        a, b = (loop.step(token, past) for loop in loops)
        np.testing.assert_allclose(b["next_token_probs"], a["next_token_probs"], atol=1e-5)
        assert a["next_token_ids"][..., 0].tolist() == b["next_token_ids"][..., 0].tolist()


def test_an_int8_graph_loses_three_nodes_per_rotated_matmul(cost, int8_artifact):
    manifest, path = _graph(int8_artifact)
    graphs = cost.variants(path)
    assert set(graphs) == {"as built", "without extra row", "without rotation", "without either"}
    before = _ops(graphs["as built"])
    turns = sum(n.name.endswith(cost.ROTATION_IN) for n in before)
    assert turns == 4 * manifest.dims.num_layers  # q/k/v, o, gate/up and down in every layer
    after = _ops(graphs["without rotation"])
    assert len(before) - len(after) == 3 * turns
    assert not [n for n in after if "rotation" in n.name]
    for name, graph in graphs.items():  # every variant runs
        assert cost.BareLoop(graph, manifest, threads=1).median_ms(past=2, steps=8) > 0, name


def test_a_graph_without_grouped_attention_is_refused_in_one_line(cost, portable_artifact):
    _, path = _graph(portable_artifact)
    with pytest.raises(ValueError, match="no GroupQueryAttention"):
        cost.without_extra_row(onnx.load(str(path)))
    assert set(cost.variants(path)) == {"as built"}
