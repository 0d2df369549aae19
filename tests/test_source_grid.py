"""Weights already on a 4-bit grid (a Q4_0 / Q4_1 GGUF) kept exactly by int4 (`exporter/source_grid.py`)."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from medusa_export.exporter.source_grid import exact_4bit_matmuls, grid_of, on_4bit_grid  # noqa: E402

K, N = 96, 40


def q4_grid(rng, shape, symmetric=False) -> np.ndarray:
    """A weight [in, out] on a GGUF grid, per block of 32 inputs, d and m stored in fp16 as GGUF does: Q4_1
    (``d * q + m``, m the block's minimum, every level used), or, ``symmetric``, Q4_0 as llama.cpp writes it
    (``d = largest / -8`` with the largest-magnitude value's sign, ``d * (q - 8)``, not every level used)."""
    k, n = shape
    x = rng.standard_normal((n, k // 32, 32)) * rng.uniform(0.02, 0.2, (n, k // 32, 1))
    if symmetric:
        largest = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)
        d = (largest / -8).astype(np.float16).astype(np.float32)
        q = np.clip(np.rint(x / d) + 8, 0, 15)
        blocks = d * (q - 8)
    else:
        low = x.min(-1, keepdims=True).astype(np.float16).astype(np.float32)
        d = ((x.max(-1, keepdims=True) - low) / 15).astype(np.float16).astype(np.float32)
        q = np.clip(np.rint((x - low) / d), 0, 15)
        q[..., 0], q[..., 1] = 0, 15  # every block spans the grid, as Q4_1's blocks do
        blocks = d * q + low
    return blocks.astype(np.float32).reshape(n, k).T.copy()


def one_matmul(path, w: np.ndarray) -> None:
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="L0/o")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, w.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, w.shape[1]])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def rewrite(path, accuracy_level: int) -> tuple[int, onnx.ModelProto]:
    model = onnx.load(str(path))
    n = exact_4bit_matmuls(model, accuracy_level)
    onnx.save_model(model, str(path))
    return n, model


def run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def dequantized(model) -> np.ndarray:
    """The weight the rewritten graph multiplies by, rebuilt from its initializers (``d * (q - 8) + offset``)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    packed, d = inits["w_q4"], inits["w_scales"].reshape(N, -1)
    q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(N, -1, 32).astype(np.float64)
    w = d[..., None] * (q - 8)
    if "w_offsets" in inits:
        w = w + inits["w_offsets"].T[..., None].astype(np.float64)
    return w.reshape(N, K).T.astype(np.float32)


@pytest.mark.parametrize("symmetric", [False, True])
def test_grid_weights_are_kept_bit_for_bit(tmp_path, symmetric):
    rng = np.random.default_rng(0)
    w = q4_grid(rng, (K, N), symmetric)
    q, d, m = grid_of(w)
    assert q.dtype == np.uint8 and q.max() <= 15
    assert np.array_equal((d[..., None] * q + m[..., None]).astype(np.float32), w.T.reshape(N, K // 32, 32))
    if symmetric:
        assert (d < 0).any() and (d > 0).any() and (q.max(-1) < 15).any()  # llama.cpp's Q4_0: d of either sign
    path = tmp_path / "g.onnx"
    one_matmul(path, w)
    n, model = rewrite(path, accuracy_level=4)
    ops = [node.op_type for node in model.graph.node]
    # Q4_0 is MatMulNBits' own symmetric grid: no offset term; Q4_1 adds the per-block offsets
    assert n == 1 and ops == (["MatMulNBits"] if symmetric else ["MatMulNBits", "MatMul", "MatMul", "Add"])
    assert np.array_equal(dequantized(model), w)
    assert "w" not in {t.name for t in model.graph.initializer}  # the fp32 weight left the graph


@pytest.mark.parametrize("symmetric", [False, True])
def test_the_rewritten_matmul_computes_the_same_product(tmp_path, symmetric):
    rng = np.random.default_rng(1)
    w = q4_grid(rng, (K, N), symmetric)
    x = rng.standard_normal((1, 5, K)).astype(np.float32)
    path = tmp_path / "g.onnx"
    one_matmul(path, w)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    rewrite(path, accuracy_level=1)  # fp32 activations: only rounding differs
    assert np.abs(run(path, x) - exact).max() <= 1e-5 * np.abs(exact).max()
    one_matmul(path, w)
    rewrite(path, accuracy_level=4)  # int8 activations per block of 32: close, and each row by itself
    y = run(path, x)
    assert np.abs(y - exact).max() <= 2e-2 * np.abs(exact).max()
    assert np.array_equal(run(path, x[:, :2]), y[:, :2]) and np.array_equal(run(path, x[:, 2:]), y[:, 2:])


def test_inputs_of_any_rank_and_weights_read_twice(tmp_path):
    """The heads read the lm_head with [batch, rows, heads, hidden] inputs; a weight may feed several MatMuls."""
    rng = np.random.default_rng(5)
    w = q4_grid(rng, (K, N))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="a"), helper.make_node("MatMul", ["x2", "w"], ["y2"], name="b")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, 3, K]),
                                           helper.make_tensor_value_info("x2", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    path = tmp_path / "g.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    n, model = rewrite(path, accuracy_level=1)
    assert n == 2 and sum(node.op_type == "MatMulNBits" for node in model.graph.node) == 2
    x, x2 = rng.standard_normal((1, 2, 3, K)).astype(np.float32), rng.standard_normal((4, K)).astype(np.float32)
    y, y2 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x, "x2": x2})
    for got, inp in ((y, x), (y2, x2)):
        exact = inp.astype(np.float64) @ w.astype(np.float64)
        assert got.shape == exact.shape and np.abs(got - exact).max() <= 1e-5 * np.abs(exact).max()


def test_weights_off_the_grid_are_left_alone(tmp_path):
    rng = np.random.default_rng(2)
    w = q4_grid(rng, (K, N))
    w[5, 3] += 1e-4  # one weight between two grid steps
    assert grid_of(w) is None
    assert grid_of(rng.standard_normal((K, N)).astype(np.float32)) is None
    assert grid_of(rng.standard_normal((K - 1, N)).astype(np.float32)) is None  # no whole blocks
    path = tmp_path / "g.onnx"
    one_matmul(path, w)
    n, model = rewrite(path, accuracy_level=4)
    assert n == 0 and [node.op_type for node in model.graph.node] == ["MatMul"]


@pytest.fixture(scope="module")
def grid_model_dir(tmp_path_factory, tiny_dirs):
    """The tiny model with every decoder Linear snapped to a Q4_1 grid, as a GGUF Q4_1 file's weights are."""
    import torch

    from conftest import make_tiny_model

    model = make_tiny_model(0)
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (m for m in layer.modules() if type(m).__name__ == "Linear"):
                w = lin.weight.numpy().T  # [in, out]
                blocks = w.T.reshape(w.shape[1], -1, 32)
                low, high = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
                d = ((high - low) / 15).astype(np.float16).astype(np.float32)  # fp16 d and m, as GGUF stores them
                low = low.astype(np.float16).astype(np.float32)
                q = np.clip(np.rint((blocks - low) / d), 0, 15)
                q[..., :1], q[..., 1:2] = 0, 15  # every block spans the grid, as a quantizer's blocks do
                lin.weight.copy_(torch.from_numpy((d * q + low).reshape(w.shape[1], -1)))
    assert on_4bit_grid(model) and not on_4bit_grid(make_tiny_model(0))
    out = tmp_path_factory.mktemp("grid") / "model"
    model.save_pretrained(out)
    for f in tiny_dirs[0].glob("tok*"):
        (out / f.name).write_bytes(f.read_bytes())
    return out


def test_int4_of_a_grid_model_keeps_its_weights_and_stays_lossless(grid_model_dir, tiny_dirs, tmp_path):
    from conftest import TINY_PROMPTS, artifact_tree_file
    from test_fused_graph import _tokens

    from medusa_export.exporter.build import build_artifact
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.build_options import BuildOptions

    out = tmp_path / "art"
    logs: list[str] = []
    build_artifact(str(grid_model_dir), out, BuildOptions(heads=str(tiny_dirs[1]), tree=artifact_tree_file(tiny_dirs),
                                                          max_seq=128, dtype="int4"), log=logs.append)
    assert any("already a 4-bit grid" in line for line in logs)
    rt = MedusaRuntime.load(out, backend="ort", threads=1)
    layers = rt.manifest.dims.num_layers
    for kind in ("medusa", "vanilla", "lanes"):
        q = rt.manifest.graphs[kind].quantization
        # every decoder matmul (q|k|v, o, gate|up, down) kept exactly; the lm_head and heads in 8 bits; no smoothing
        assert q.source_grid == 4 * layers and q.other_bits == 8 and q.smooth_alpha == 0.0 and q.matmuls_left_fp == 0
    assert rt.manifest.validation["lanes"]  # the batched graph gave each sequence its one-sequence numbers
    for prompt in TINY_PROMPTS[:3]:
        assert _tokens(rt, prompt, True, n=16) == _tokens(rt, prompt, False, n=16)


def test_a_q8_0_tied_lm_head_is_kept_exactly_and_the_embedding_gathers_from_it(tmp_path):
    from test_quantized_embedding import H as hidden
    from test_quantized_embedding import V as vocab
    from test_quantized_embedding import _graph

    from medusa_export.exporter.quantize import quantize_graph

    rng = np.random.default_rng(4)
    d = rng.uniform(0.002, 0.02, (vocab, hidden // 32, 1)).astype(np.float16).astype(np.float32)
    q = rng.integers(-127, 128, (vocab, hidden // 32, 32)).astype(np.float32)
    q[..., 0] = 127  # Q8_0: d = max|w| / 127
    table = (d * q).reshape(vocab, hidden)
    path = tmp_path / "g.onnx"
    _graph(path, table, table)  # the tied embedding and lm_head of an exported graph
    record = quantize_graph(path, "int4", source_grid=True)
    assert record["source_grid"] == 1 and record["other_bits"] == 8 and record["smooth_alpha"] == 0.0
    assert record["embedding"] == "GatherBlockQuantized on the lm_head's weights"
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node] == ["GatherBlockQuantized", "MatMulNBits"]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    head = model.graph.node[1]
    stored = (inits[head.input[1]].reshape(vocab, -1, 32).astype(np.float32) - 128) * inits[head.input[2]][..., None]
    assert np.array_equal(stored.reshape(vocab, hidden), table)  # the Q8_0 weights, bit for bit
    ids = np.arange(vocab)
    rows = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    exact = table.astype(np.float64) @ table.T.astype(np.float64)
    assert np.abs(rows - exact).max() <= 1e-2 * np.abs(exact).max()  # only the int8 activations differ
