"""Input rotations for quantized graphs (`exporter/rotation.py`): an orthogonal turn of each block of a matmul's
input, undone in its weight, leaves the product unchanged (row independence and lossless Medusa on rotated int8
graphs: tests/test_fused_graph.py and tests/test_engine.py, whose int8 artifacts carry the rotation)."""

from __future__ import annotations

import numpy as np
import pytest

from medusa_export.exporter.rotation import InputRotation, hadamard


@pytest.mark.parametrize("n", [1, 2, 32, 128])
def test_hadamard_is_orthonormal(n):
    h = hadamard(n)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    assert np.allclose(np.abs(h), 1 / np.sqrt(n))  # every input channel spread evenly over the block


@pytest.mark.parametrize("n", [0, 3, 96])
def test_hadamard_refuses_other_sizes(n):
    with pytest.raises(ValueError, match="power of two"):
        hadamard(n)


@pytest.mark.parametrize("width, block", [(576, 64), (1536, 128), (64, 64), (96, 32), (7, 1)])
def test_the_block_is_the_largest_power_of_two_dividing_the_width(width, block):
    assert InputRotation(max_block=128).block_of(width) == block


@pytest.mark.parametrize("width", [576, 1536, 96])
def test_a_turned_input_times_the_turned_back_weight_is_the_same_product(width):
    rng = np.random.default_rng(0)
    r = InputRotation(max_block=128)
    x, w = rng.standard_normal((3, width)), rng.standard_normal((width, 40)).astype(np.float32)
    block = r.block_of(width)
    turned = (x.reshape(3, -1, block) @ r.matrix(block)).reshape(3, width)
    np.testing.assert_allclose(turned @ r.weight(w), x @ w, rtol=1e-4, atol=1e-4)


def test_an_outlier_channel_is_spread_over_its_block():
    """What the rotation is for: a block with one large channel among small ones has a small max afterwards."""
    r = InputRotation(max_block=32)
    x = np.full(32, 0.01)
    x[5] = 10.0
    turned = x @ r.matrix(32)
    assert np.abs(turned).max() < np.abs(x).max() / 5
    np.testing.assert_allclose(np.linalg.norm(turned), np.linalg.norm(x))


def test_the_signs_are_fixed_so_a_rebuild_gives_the_same_graph():
    np.testing.assert_array_equal(InputRotation(64).matrix(64), InputRotation(64).matrix(64))
    assert not np.array_equal(InputRotation(64).matrix(64), hadamard(64))  # random signs applied


@pytest.mark.parametrize("paths", [1, 3])
def test_a_rotated_fused_graph_computes_the_models_function(tmp_path, paths):
    """fp32, before any quantization: the rotated graph's outputs and KV rows match PyTorch within the export
    tolerance (`validate_graph` raises otherwise), one-sequence and per-path tree steps alike."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    onnx = pytest.importorskip("onnx")
    from conftest import make_tiny_model

    from medusa_export.exporter.fused_graph import export_fused_graph
    from medusa_export.exporter.heads import HeadsConfig, MedusaHeads
    from medusa_export.exporter.step_model import StepModel
    from medusa_export.exporter.validate import validate_graph
    from medusa_export.runtime import io_table

    model = make_tiny_model(seed=1)
    heads = MedusaHeads(HeadsConfig(model.config.hidden_size, model.config.vocab_size, num_heads=2))
    step = StepModel(model, heads, 10, 32)
    path = export_fused_graph(step, tmp_path / "medusa.onnx", paths=paths, rotation=32)
    nodes = onnx.load(str(path)).graph.node
    assert sum(n.name.endswith("/rotation") for n in nodes) == 4 * model.config.num_hidden_layers
    report = validate_graph(step, path, kv_layout=io_table.HEAD_MAJOR_SHARED, paths=paths)
    assert max(report["max_abs_error"].values()) <= report["tolerance"]
