"""int8 matmuls on activations quantized per row (`build --int8-matmul rows`, `exporter/quantize_rows.py`): a row
of a row-quantized matmul computed by itself and close to the fp32 product, zero and NaN rows handled, the options
checked; on tiny artifacts, tree nodes bit-identical to one-token steps, greedy Medusa equal to greedy vanilla,
batched answers equal to answers alone."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import test_attention_kernel  # noqa: F401 (skips this module where the kernel cannot run)
import test_engine as engine_tests  # noqa: E402
import test_fused_graph as fused_tests  # noqa: E402
from conftest import TINY_PROMPTS  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402
from test_cli import assert_one_line_error, cli  # noqa: E402

from medusa_export.runtime import kernels  # noqa: E402
from medusa_export.runtime.build_options import BuildOptions  # noqa: E402
from medusa_export.runtime.errors import InputError  # noqa: E402

ort = pytest.importorskip("onnxruntime")

def _rows_matmul_model(k: int, n: int, seed: int = 0):
    """x [1, S, k] @ W [k, n] in fp32, the MatMul named "proj"; W returned too."""
    from onnx import numpy_helper

    w = np.random.default_rng(seed).standard_normal((k, n), dtype=np.float32)
    f = TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], "proj")], "mm",
                              [helper.make_tensor_value_info("x", f, [1, "S", k])],
                              [helper.make_tensor_value_info("y", f, [1, "S", n])], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), w


def _rows_matmul_session(k: int, n: int, seed: int = 0):
    """x [1, S, k] @ W [k, n] as `quantize_rows` writes it; W's fp32 values returned too."""
    from medusa_export.exporter.quantize_rows import quantize_rows

    model, w = _rows_matmul_model(k, n, seed)
    assert quantize_rows(model, keep=lambda _name: False) == 1
    assert [n.op_type for n in model.graph.node] == [kernels.QUANTIZE_OP, "MatMulInteger", kernels.SCALE_OP]
    assert "w" not in {i.name for i in model.graph.initializer}  # the fp32 weight is gone
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    kernels.register(opts, "kernel")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]), w


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(2, 20), row=st.integers(0, 19), k=st.sampled_from([8, 40, 64]), seed=st.integers(0, 999))
def test_a_row_quantized_matmul_computes_each_row_by_itself(rows, row, k, seed):
    """A row's product is bit-identical alone and among others, and close to the fp32 product."""
    session, w = _rows_matmul_session(k, 24, seed)
    row = min(row, rows - 1)
    x = np.random.default_rng(seed + 1).standard_normal((1, rows, k), dtype=np.float32) * 3
    many = session.run(None, {"x": x})[0]
    one = session.run(None, {"x": x[:, row:row + 1].copy()})[0]
    np.testing.assert_array_equal(many[0, row], one[0, 0])
    exact = x[0] @ w
    assert np.abs(many[0] - exact).max() <= 0.03 * np.abs(exact).max()


@pytest.mark.parametrize("turned", [False, True])
def test_a_row_quantized_matmul_over_many_rows_computes_each_row_by_itself(turned):
    """Enough rows and columns that RowQuantize (with and without the input rotation) and ScaleRows spread them over
    ONNX Runtime's threads: each row equals the row alone."""
    from medusa_export.exporter.quantize_rows import quantize_rows

    if turned:
        model, _ = _rotated_matmul_model(256, 256, 32)
        quantize_rows(model, keep=lambda _name: False)
        session = _kernel_session(model)
    else:
        session, _ = _rows_matmul_session(256, 256)
    x = np.random.default_rng(3).standard_normal((1, 90, 256), dtype=np.float32)  # 23,040 values each way
    x[0, 50] = 0.0
    x[0, 51, 9] = np.nan
    x[0, 52] *= 1e-39  # so small that 127 / max overflows, turned or not: taken as zeros
    many = session.run(None, {"x": x})[0]
    assert (many[0, 50] == 0).all() and np.isnan(many[0, 51]).all() and (many[0, 52] == 0).all()
    for r in (0, 7, 8, 45, 50, 51, 52, 89):
        np.testing.assert_array_equal(many[0, r], session.run(None, {"x": x[:, r:r + 1].copy()})[0][0, 0])


def test_a_row_quantized_matmul_takes_zero_rows_and_passes_a_nan_on():
    session, _ = _rows_matmul_session(40, 8)
    x = np.ones((1, 4, 40), np.float32)  # 32 columns in the vector path, 8 in the scalar one
    x[0, 0] = 0.0
    x[0, 2, 5] = np.nan
    x[0, 3] = 0.0
    x[0, 3, [0, 11]] = 1e-37, 5e-38  # so small that 127 / max overflows: taken as zeros
    y = session.run(None, {"x": x})[0][0]
    assert (y[0] == 0).all() and np.isfinite(y[1]).all() and np.isnan(y[2]).all() and (y[3] == 0).all()


def _rotated_matmul_model(k: int, n: int, block: int, seed: int = 0):
    """x [1, S, k] turned per block by `InputRotation` (Reshape, MatMul named */rotation, Reshape) and multiplied by
    the weight turned back, as `fused_backbone` writes a rotated projection; W's fp32 values returned too."""
    from onnx import numpy_helper

    from medusa_export.exporter.rotation import SUFFIX, InputRotation

    r = InputRotation(block)
    w = np.random.default_rng(seed).standard_normal((k, n), dtype=np.float32)
    f, b = TensorProto.FLOAT, r.block_of(k)
    inits = [numpy_helper.from_array(r.matrix(b).astype(np.float32), "R"),
             numpy_helper.from_array(np.array([0, 0, k // b, b], np.int64), "blocks"),
             numpy_helper.from_array(np.array([0, 0, k], np.int64), "rows"),
             numpy_helper.from_array(r.weight(w), "w")]
    nodes = [helper.make_node("Reshape", ["x", "blocks"], ["xb"], "proj/rotation_in"),
             helper.make_node("MatMul", ["xb", "R"], ["tb"], "proj" + SUFFIX),
             helper.make_node("Reshape", ["tb", "rows"], ["t"], "proj/rotation_out"),
             helper.make_node("MatMul", ["t", "w"], ["y"], "proj")]
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", f, [1, "S", k])],
                              [helper.make_tensor_value_info("y", f, [1, "S", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), w


def _kernel_session(model):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    kernels.register(opts, "kernel")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def op_session(op: str, k: int, *constants: np.ndarray):
    """A session of one node of the kernel library's ``op``: x [1, k] then ``constants`` as its inputs, y out."""
    from onnx import numpy_helper

    names = [f"c{i}" for i in range(len(constants))]
    f = TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node(op, ["x", *names], ["y"], domain=kernels.DOMAIN)], op,
                              [helper.make_tensor_value_info("x", f, [1, k])],
                              [helper.make_tensor_value_info("y", f, None)],
                              [numpy_helper.from_array(a, n) for a, n in zip(constants, names)])
    return _kernel_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                                   helper.make_opsetid(kernels.DOMAIN, 1)]))


def assert_refused(op: str, message: str, cases) -> None:
    """Each case (k, *constants): a one-node session of ``op`` refuses x [1, k] with ``message``."""
    for k, *constants in cases:
        with pytest.raises(Exception, match=message):
            op_session(op, k, *constants).run(None, {"x": np.ones((1, k), np.float32)})


def bad_block_shapes(per_line: int, width: int, dtype) -> list[tuple]:
    """The 4-bit block ops' bad constants (k, w, scales, lows): w [N/16, K/per_line, width] and [groups, K/32, 16]
    scales and lows of ``dtype``, each case wrong in one way (K, lines, bytes a line, groups, lows, rank)."""
    ones = lambda *shape: np.ones(shape, dtype)  # noqa: E731
    w = np.zeros((1, 64 // per_line, width), np.uint8)
    return [(48, np.zeros((1, 48 // per_line, width), np.uint8), ones(1, 1, 16), ones(1, 1, 16)),  # K % 32
            (0, np.zeros((1, 0, width), np.uint8), ones(1, 0, 16), ones(1, 0, 16)),  # K = 0
            (64, np.zeros((1, 32 // per_line, width), np.uint8), ones(1, 2, 16), ones(1, 2, 16)),  # lines
            (64, np.zeros((1, 64 // per_line, 48 - width), np.uint8), ones(1, 2, 16), ones(1, 2, 16)),  # bytes
            (64, w, ones(2, 2, 16), ones(2, 2, 16)),  # groups
            (64, w, ones(1, 2, 16), ones(1, 3, 16)),  # lows / offsets
            (64, w, ones(1, 2, 16), ones(2, 16))]  # rank 2


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(2, 12), row=st.integers(0, 11), k=st.sampled_from([64, 96, 192]), block=st.sampled_from([8, 32, 64]),
       seed=st.integers(0, 999))
def test_a_rotated_input_is_turned_inside_row_quantize(rows, row, k, block, seed):
    """The rotation's Reshape / MatMul / Reshape go, RowQuantize takes the input and the signs; the product stays
    close to x @ W, and a row among many is bit-identical to the row alone."""
    from medusa_export.exporter.quantize_rows import quantize_rows

    model, w = _rotated_matmul_model(k, 24, block, seed)
    assert quantize_rows(model, keep=lambda _name: False) == 1  # the rotation's MatMul is folded, not quantized
    ops = [(n.op_type, len(n.input)) for n in model.graph.node]
    assert ops == [(kernels.QUANTIZE_OP, 2), ("MatMulInteger", 3), (kernels.SCALE_OP, 3)]
    assert {i.name for i in model.graph.initializer} >= {model.graph.node[0].input[1]} and "R" not in {
        i.name for i in model.graph.initializer}
    session = _kernel_session(model)
    row = min(row, rows - 1)
    x = np.random.default_rng(seed + 1).standard_normal((1, rows, k), dtype=np.float32) * 3
    x[0, :, seed % k] *= 30  # an outlier channel, which the rotation spreads
    many = session.run(None, {"x": x})[0]
    np.testing.assert_array_equal(many[0, row], session.run(None, {"x": x[:, row:row + 1].copy()})[0][0, 0])
    exact = x[0] @ w
    assert np.abs(many[0] - exact).max() <= 0.03 * np.abs(exact).max()


@pytest.mark.parametrize("k, block", [(192, 64), (96, 32), (45, 0)])  # 45: an odd width, nothing to turn
def test_quantize_rows_turns_the_inputs_it_is_asked_to(k, block):
    """``turn``: a MatMul whose input the graph does not turn gets the rotation from `quantize_rows` itself (its
    weight turned, the signs to RowQuantize, blocks of the largest power of two up to ``turn_block`` dividing the
    width): the product stays x @ W, and closer to it than unturned when one input channel dwarfs the others; a row
    among many equals the row alone."""
    from medusa_export.exporter.quantize_rows import quantize_rows, turned_blocks

    n = 40
    session_of = {}
    for turned in (False, True):
        model, w = _rows_matmul_model(k, n)
        quantize_rows(model, keep=lambda _name: False, turn=lambda name: turned and name == "proj", turn_block=64)
        assert turned_blocks(model.graph, lambda _name: True) == [block if turned else 0]
        session_of[turned] = _kernel_session(model)
    if not block:
        return
    x = np.random.default_rng(5).standard_normal((1, 30, k), dtype=np.float32)
    x[0, :, 7] *= 200  # an outlier channel: one scale per row leaves the others few steps
    exact = x[0].astype(np.float64) @ w
    errors = {t: np.abs(s.run(None, {"x": x})[0][0] - exact).mean() for t, s in session_of.items()}
    assert errors[True] < 0.5 * errors[False]
    many = session_of[True].run(None, {"x": x})[0]
    np.testing.assert_array_equal(many[0, 3], session_of[True].run(None, {"x": x[:, 3:4].copy()})[0][0, 0])


@pytest.mark.parametrize("block", [2, 16, 64])
def test_row_quantize_turns_each_block_by_the_signed_hadamard_matrix(block):
    """q and the scale of a turned row dequantize to x @ diag(signs) H / sqrt(B) within half a step."""
    from medusa_export.exporter.rotation import InputRotation

    f, k = TensorProto.FLOAT, 128
    node = helper.make_node(kernels.QUANTIZE_OP, ["x", "signs"], ["q", "scale"], domain=kernels.DOMAIN)
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", f, ["S", "K"]),
                                            helper.make_tensor_value_info("signs", f, [block])],
                              [helper.make_tensor_value_info("q", TensorProto.UINT8, ["S", "K"]),
                               helper.make_tensor_value_info("scale", f, ["S", 1])])
    session = _kernel_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                                        helper.make_opsetid(kernels.DOMAIN, 1)]))
    matrix = InputRotation(block).matrix(block)
    signs = np.sign(matrix[:, 0]).astype(np.float32)
    x = np.random.default_rng(block).standard_normal((5, k)).astype(np.float32)
    q, scale = session.run(None, {"x": x, "signs": signs})
    turned = (x.reshape(5, k // block, block).astype(np.float64) @ matrix).reshape(5, k)
    assert np.all(np.abs((q.astype(np.float64) - 128) * scale - turned) <= scale * 0.5 + 1e-5)
    with pytest.raises(Exception, match="RowQuantize: signs must be"):
        session.run(None, {"x": x[:, :96].copy() if block == 64 else x[:, :3].copy(), "signs": signs})
    # the transform's exact arithmetic: the butterflies of spans 1, 2, 4, ... in float32, as the scalar code does
    z = (x * np.tile(signs, k // block)).reshape(5, k // block, block)
    h = 1
    while h < block:
        pairs = z.reshape(5, k // block, block // (2 * h), 2, h)
        a, c = pairs[:, :, :, 0].copy(), pairs[:, :, :, 1].copy()
        pairs[:, :, :, 0], pairs[:, :, :, 1] = a + c, a - c
        h *= 2
    z = z.reshape(5, k)
    peak = np.abs(z).max(axis=1, keepdims=True)
    expected_q = np.clip(np.rint(z * (np.float32(127) / peak)), -127, 127).astype(np.int32) + 128
    np.testing.assert_array_equal(q, expected_q.astype(np.uint8))
    np.testing.assert_array_equal(scale, peak / np.float32(127) * (np.float32(1) / np.sqrt(np.float32(block))))


@pytest.mark.parametrize("turned", [False, True])
def test_two_passes_quantize_what_the_first_left_and_keep_each_row_by_itself(turned):
    """``residual``: RowQuantize and ScaleRows with passes = 2 (the row, then what its first quantization left, both
    through one MatMulInteger); the product is much closer to x @ W than one pass (about as close as the int8
    weights allow), rows of zeros, NaNs and subnormals come out as with one pass, and a row among many, spread over
    the threads, equals the row alone."""
    from medusa_export.exporter.quantize_rows import quantize_rows, residual_matmuls

    x = np.random.default_rng(7).standard_normal((1, 90, 256), dtype=np.float32)
    x[0, :, 7] *= 60  # an outlier channel: one pass leaves the others few steps
    x[0, 50] = 0.0
    x[0, 51, 9] = np.nan
    x[0, 52] *= 1e-39
    fine = np.array([r not in (50, 51, 52) for r in range(90)])
    out = {}
    for passes in (1, 2):
        model, w = _rotated_matmul_model(256, 64, 32) if turned else _rows_matmul_model(256, 64)
        quantize_rows(model, keep=lambda _name: False, residual=lambda name: passes == 2 and name == "proj")
        assert residual_matmuls(model.graph) == (["proj/row_quantize"] if passes == 2 else [])
        assert [len(n.attribute) for n in model.graph.node] == [passes - 1, 0, passes - 1]
        session = _kernel_session(model)
        out[passes] = many = session.run(None, {"x": x})[0]
        assert many.shape == (1, 90, 64)
        assert (many[0, 50] == 0).all() and np.isnan(many[0, 51]).all() and (many[0, 52] == 0).all()
        for r in (0, 8, 49, 50, 51, 52, 89):
            np.testing.assert_array_equal(many[0, r], session.run(None, {"x": x[:, r:r + 1].copy()})[0][0, 0])
    exact = x[0].astype(np.float64) @ w
    errors = {p: np.abs(out[p][0][fine] - exact[fine]).mean() for p in (1, 2)}
    assert errors[2] < (0.8 if turned else 0.4) * errors[1]
    if not turned:  # what is left is the weights' rounding: about the error of fp32 activations times int8 weights
        step = np.abs(w).max(axis=0) / 127
        weights_alone = np.abs(x[0][fine].astype(np.float64) @ (np.rint(w / step) * step) - exact[fine]).mean()
        assert errors[2] < 1.3 * weights_alone


def test_two_pass_ops_check_their_attribute_and_shapes():
    """passes other than 1 or 2 is refused when the session is made; ScaleRows with two passes wants [..., 2, N]."""
    f = TensorProto.FLOAT

    def session(node, inputs, outputs):
        graph = helper.make_graph([node], "g", inputs, outputs)
        return _kernel_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                                        helper.make_opsetid(kernels.DOMAIN, 1)]))

    with pytest.raises(Exception, match="passes must be 1 or 2"):
        session(helper.make_node(kernels.QUANTIZE_OP, ["x"], ["q", "s"], domain=kernels.DOMAIN, passes=3),
                [helper.make_tensor_value_info("x", f, ["S", 8])],
                [helper.make_tensor_value_info("q", TensorProto.UINT8, None), helper.make_tensor_value_info("s", f, None)])
    scale = session(helper.make_node(kernels.SCALE_OP, ["y", "s", "c"], ["o"], domain=kernels.DOMAIN, passes=2),
                    [helper.make_tensor_value_info("y", TensorProto.INT32, None),
                     helper.make_tensor_value_info("s", f, None), helper.make_tensor_value_info("c", f, [4])],
                    [helper.make_tensor_value_info("o", f, None)])
    c = np.ones(4, np.float32)
    o = scale.run(None, {"y": np.arange(16, dtype=np.int32).reshape(2, 2, 4), "s": np.full((2, 2, 1), 0.5, np.float32),
                         "c": c})[0]
    np.testing.assert_array_equal(o, 0.5 * (np.arange(16).reshape(2, 2, 4)[:, 0] + np.arange(16).reshape(2, 2, 4)[:, 1]))
    with pytest.raises(Exception, match=r"with passes = 2, y must be \[\.\.\., 2, N\]"):
        scale.run(None, {"y": np.zeros((3, 4), np.int32), "s": np.ones((3, 1), np.float32), "c": c})


def test_build_options_check_int8_matmul_rows():
    for bad, fix in ((dict(dtype="int8", int8_matmul="rows"), "add --attention kernel, or"),  # only what is missing
                     (dict(dtype="fp32", attention="kernel", int8_matmul="rows"), "add --dtype int8, or"),
                     (dict(int8_matmul="rows"), "add --dtype int8 and --attention kernel, or")):
        with pytest.raises(InputError, match="--int8-matmul rows needs --dtype int8 and --attention kernel") as e:
            BuildOptions(**bad)
        assert fix in str(e.value)
    with pytest.raises(InputError, match="--int8-matmul 'nibbles'"):
        BuildOptions(int8_matmul="nibbles")
    assert BuildOptions(dtype="int8", attention="kernel", int8_matmul="rows").recipe == "int8_rows"


@pytest.fixture(scope="module")
def rows_runtimes(tiny_dirs, tmp_path_factory):
    """fp32 and int8 with --int8-matmul rows, both with the attention kernel and the full lm_head (the int8 recipe's
    own, turned per row; the screened one: tests/test_screened_lm_head.py), 3 lanes, a chat tokenizer."""
    return engine_tests.build_runtimes(tiny_dirs, tmp_path_factory.mktemp("rows"), dtypes=("fp32", "int8"),
                                       int8={"int8_matmul": "rows"}, attention="kernel", lm_head="full")


def test_row_quantized_artifacts_record_and_hold_integer_matmuls(rows_runtimes):
    import dataclasses

    import onnx

    rt = rows_runtimes["int8"]
    for kind, graph in rt.manifest.graphs.items():
        q = graph.quantization
        assert q.name == "int8" and q.method == "MatMulInteger" and q.matmuls_left_fp == 0 and q.rotation == 32
        ops = [n.op_type for n in onnx.load(str(rt.generator.backend.directory / graph.file),
                                            load_external_data=False).graph.node]
        assert ops.count("MatMulInteger") == ops.count(kernels.QUANTIZE_OP) == ops.count(kernels.SCALE_OP) >= 4 * 2
        assert "MatMulNBits" not in ops and q.lm_head_rotation == 64  # the base lm_head per row too, its input turned
        model = onnx.load(str(rt.generator.backend.directory / graph.file), load_external_data=False)
        inits = {i.name: i for i in model.graph.initializer}
        tail = {n.name: [tuple(inits[i].dims) if i in inits else i for i in n.input[1:]] for n in model.graph.node
                if n.op_type == kernels.QUANTIZE_OP and n.name.startswith("tail")}
        assert tail.pop("tail//lm_head/MatMul/row_quantize") == [(64,)]  # the signs: blocks of 64
        assert all(extra == [] for extra in tail.values())  # the heads' inputs are not turned
        assert bool(tail) == (kind == "medusa")  # the heads: their blocks and projection
    weights = {kind: {i.name: i.raw_data for i in onnx.load(str(rt.generator.backend.directory / g.file)).graph.initializer
                      if i.name.endswith("weight_int8") and not i.name.startswith("tail//heads")}
               for kind, g in rt.manifest.graphs.items()}
    assert weights["vanilla"] == weights["medusa"] == weights["lanes"]  # every graph the same int8 weights
    data = rt.manifest.to_json()
    assert all(g["quantization"]["lm_head_rotation"] == 64 for g in data["graphs"].values())
    unturned = dataclasses.replace(rt.manifest.graphs["vanilla"].quantization, lm_head_rotation=0)
    graphs = {**rt.manifest.graphs,
              "vanilla": dataclasses.replace(rt.manifest.graphs["vanilla"], quantization=unturned)}
    data = rt.manifest.replace(graphs=graphs).to_json()
    assert "lm_head_rotation" not in data["graphs"]["vanilla"]["quantization"]  # older releases read it


def test_row_quantized_tree_nodes_are_bit_identical_to_one_token_steps(rows_runtimes):
    fused_tests.test_tree_step_is_bit_identical_to_plain_one_token_steps(
        rows_runtimes["fp32"], {"int8": (rows_runtimes["int8"], None)}, "int8")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=fused_tests.random_trees(fused_tests.NUM_HEADS, max_paths=fused_tests.ARTIFACT_PATHS),
       which=st.integers(0, len(TINY_PROMPTS) - 1))
def test_row_quantized_greedy_medusa_equals_greedy_vanilla(rows_runtimes, tree, which):
    rt, prompt = rows_runtimes["int8"], TINY_PROMPTS[which]
    assert fused_tests._tokens(rt, prompt, True, tree=tree, n=16) == fused_tests._tokens(rt, prompt, False, n=16)


def test_row_quantized_batched_answers_equal_answers_alone(rows_runtimes):
    engine_tests.test_every_answer_equals_its_answer_alone(rows_runtimes, "int8")
    engine_tests.test_context_drafts_in_batched_steps_change_no_answer(rows_runtimes, "int8")


def test_the_cli_refuses_int8_matmul_rows_without_the_kernel(tmp_path):
    out = tmp_path / "art"
    proc = cli("build", "--out", str(out), "--dtype", "int8", "--int8-matmul", "rows")
    assert_one_line_error(proc, "--int8-matmul rows needs --dtype int8 and --attention kernel")
    assert not out.exists() or not any(out.iterdir())
