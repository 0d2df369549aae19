"""GPTQ rounding of per-column int8 weights (`exporter/gptq.py`): closer products than rounding to nearest on inputs
like the calibration's, nearest rounding where inputs do not correlate, the Hessians of the graph's matmuls, and
`quantize_rows` turning them as the graph turns the inputs."""

from __future__ import annotations

import numpy as np
import pytest

from medusa_export.exporter.gptq import Rounding, input_hessians, round_columns, turned_hessian
from medusa_export.exporter.rotation import InputRotation


def _correlated_inputs(rows: int, k: int, seed: int, draw: int = 0) -> np.ndarray:
    """Inputs whose channels mix a few shared factors (as activations do; ``seed`` picks the mixing, ``draw`` the
    sample), one channel far louder."""
    mixing = np.random.default_rng(seed).standard_normal((8, k))
    rng = np.random.default_rng([seed, draw])
    x = rng.standard_normal((rows, 8)) @ mixing + 0.3 * rng.standard_normal((rows, k))
    x[:, 3] *= 10
    return x


def _nearest(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(w / scale), -127, 127).astype(np.int8)


@pytest.mark.parametrize("k, n, seed", [(64, 48, 0), (96, 40, 1), (200, 16, 2)])
def test_gptq_products_are_closer_than_nearest_on_inputs_like_the_calibration(k, n, seed):
    rng = np.random.default_rng(seed + 10)
    w = rng.standard_normal((k, n))
    scale = np.abs(w).max(axis=0) / 127
    calibration, held_out = _correlated_inputs(2000, k, seed), _correlated_inputs(500, k, seed, draw=1)
    q = round_columns(w, calibration.T @ calibration, scale)
    assert q.dtype == np.int8 and q.shape == (k, n) and np.abs(q.astype(int)).max() <= 127
    exact = held_out @ w
    error = {name: np.linalg.norm(held_out @ (qq * scale) - exact)
             for name, qq in (("gptq", q), ("nearest", _nearest(w, scale)))}
    assert error["gptq"] < 0.7 * error["nearest"]
    np.testing.assert_array_equal(q, round_columns(w, calibration.T @ calibration, scale))  # deterministic


def test_gptq_rounds_to_nearest_where_inputs_do_not_correlate():
    """A diagonal Hessian moves no error between rows; an input the calibration never set is rounded to nearest and
    moves nothing either."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((32, 12))
    scale = np.abs(w).max(axis=0) / 127
    np.testing.assert_array_equal(round_columns(w, np.diag(rng.uniform(1, 5, 32)), scale), _nearest(w, scale))
    x = _correlated_inputs(500, 32, 5)
    x[:, 7] = 0.0  # a dead channel
    q = round_columns(w, x.T @ x, scale)
    np.testing.assert_array_equal(q[7], _nearest(w, scale)[7])
    with pytest.raises(ValueError, match="do not match"):
        round_columns(w, np.eye(31), scale)


def test_turned_hessian_is_the_hessian_of_the_turned_inputs():
    x = _correlated_inputs(300, 96, 6)
    r = InputRotation(32).matrix(32)
    turned = (x.reshape(300, 3, 32) @ r).reshape(300, 96)
    np.testing.assert_allclose(turned_hessian(x.T @ x, r), turned.T @ turned, rtol=1e-9, atol=1e-6)


def test_rounding_remembers_its_results_and_names_its_matmuls():
    rng = np.random.default_rng(7)
    w, x = rng.standard_normal((16, 8)), _correlated_inputs(100, 16, 7)
    rounding = Rounding({"L0/down": x.T @ x})
    assert rounding.hessian("L0/down") is not None and rounding.hessian("L0/o") is None
    scale = np.abs(w).max(axis=0) / 127
    assert rounding(w, x.T @ x, scale) is rounding(w.copy(), (x.T @ x).copy(), scale.copy())


@pytest.mark.parametrize("turned", [False, True])
def test_quantize_rows_rounds_by_gptq_in_the_basis_the_matmul_sees(turned):
    """With the input rotation folded into RowQuantize, the weights are turned; so must be the Hessian, or GPTQ
    would spread the errors along the wrong directions. Either way the product beats rounding to nearest (the
    activations in two passes, so that the weights' rounding is what is left)."""
    import test_int8_rows as rows_tests

    from medusa_export.exporter.quantize_rows import quantize_rows

    k, n = 256, 64
    calibration, held_out = _correlated_inputs(3000, k, 8), _correlated_inputs(400, k, 8, draw=1)
    products = {}
    for rounded in (False, True):
        model, w = (rows_tests._rotated_matmul_model(k, n, 32) if turned else rows_tests._rows_matmul_model(k, n))
        rounding = Rounding({"proj": calibration.T @ calibration}) if rounded else None
        quantize_rows(model, keep=lambda _name: False, rounding=rounding, residual=lambda _name: True)
        x = held_out.astype(np.float32)[None]
        products[rounded] = rows_tests._kernel_session(model).run(None, {"x": x})[0][0]
    exact = held_out @ w
    errors = {r: np.linalg.norm(p - exact) for r, p in products.items()}
    assert errors[True] < 0.5 * errors[False]


def test_input_hessians_cover_every_decoder_matmul_and_the_lm_head(tiny_dirs):
    import torch

    from medusa_export.exporter.model_loading import load_base_model

    model = load_base_model(str(tiny_dirs[0])).model.eval()
    cfg = model.config
    seqs = [[1, 5, 9, 2, 7], [3, 4, 8]]
    h = input_hessians(model, seqs)
    layers = cfg.num_hidden_layers
    assert len(h) == 4 * layers + 1
    d, inner = cfg.hidden_size, cfg.intermediate_size
    for i in range(layers):
        assert h[f"L{i}/qkv"].shape == h[f"L{i}/o"].shape == h[f"L{i}/gate_up"].shape == (d, d)
        assert h[f"L{i}/down"].shape == (inner, inner)
    # the lm_head's input is the final norm's output: its X^T X over both sequences
    with torch.no_grad():
        states = [model.model(torch.tensor([s])).last_hidden_state[0].double() for s in seqs]
    expected = sum((s.T @ s).numpy() for s in states)
    np.testing.assert_allclose(h["tail//lm_head/MatMul"], expected, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="calibration"):
        input_hessians(model, [])


def test_a_rotation_left_in_the_graph_gets_weights_rounded_to_nearest():
    """An input rotation that `quantize_rows` cannot fold (its output read twice) turns the input in the graph; the
    Hessian GPTQ was given is of the unturned input, so that MatMul's weights are rounded to nearest instead."""
    import test_int8_rows as rows_tests
    from onnx import helper, numpy_helper

    from medusa_export.exporter.quantize_rows import quantize_rows

    model, _ = rows_tests._rotated_matmul_model(64, 16, 32)
    model.graph.node.append(helper.make_node("Identity", ["t"], ["t_again"], "second_reader"))
    model.graph.output.append(helper.make_tensor_value_info("t_again", 1, None))
    turned = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w"))
    x = _correlated_inputs(500, 64, 3)
    quantize_rows(model, keep=lambda _name: False, rounding=Rounding({"proj": x.T @ x}))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_array_equal(inits["proj/weight_int8"], _nearest(turned, inits["proj/column_scale"]))
    assert any(n.name.endswith("/rotation") and n.op_type == "MatMul" for n in model.graph.node)  # left in the graph
