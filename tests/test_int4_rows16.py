"""The model's own 4-bit blocks times each row as int16 (`build --dtype int4 --int4-matmul rows16`, the kernel's
BlockMatMul16Q4, `exporter/quantize_rows.block_int4`): the packing, the product against a float64 model of it, each
row computed by itself, the AMX, AVX-512 and AVX2 paths bit-identical, bad shapes refused, weights off the grid left to
BlockMatMul16; on a tiny model on a Q4_1 grid, the artifact's record, tree nodes bit-identical to one-token steps,
greedy Medusa equal to greedy vanilla and batched answers equal to answers alone; a model off the grid refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import test_attention_kernel  # noqa: F401 (skips this module where the kernel cannot run)
import test_engine as engine_tests  # noqa: E402
import test_fused_graph as fused_tests  # noqa: E402
import test_int8_rows as rows_tests  # noqa: E402
import test_int8_rows16 as int8_rows16_tests  # noqa: E402
from conftest import TINY_PROMPTS, artifact_tree_file  # noqa: E402
from test_cli import assert_one_line_error, cli  # noqa: E402
from test_source_grid import grid_model_dir, q4_grid  # noqa: E402,F401 (grid_model_dir: a fixture used here)

from medusa_export.exporter.quantize_rows import block_int4, quantize_rows  # noqa: E402
from medusa_export.exporter.source_grid import grid_of  # noqa: E402
from medusa_export.runtime import kernels  # noqa: E402
from medusa_export.runtime.build_options import BuildOptions  # noqa: E402
from medusa_export.runtime.errors import InputError  # noqa: E402

ort = pytest.importorskip("onnxruntime")


def _grid_model(k: int, n: int, seed: int = 0, symmetric: bool = False):
    """x [1, S, k] @ W [k, n], W on a Q4_1 (or, ``symmetric``, Q4_0) grid per block of 32 inputs; W returned too."""
    from onnx import numpy_helper

    model, _ = rows_tests._rows_matmul_model(k, n, seed)
    w = q4_grid(np.random.default_rng(seed), (k, n), symmetric)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    return model, w


def _grid_session(k: int, n: int, seed: int = 0, symmetric: bool = False):
    model, w = _grid_model(k, n, seed, symmetric)
    assert quantize_rows(model, keep=lambda _name: False, wide=True, grid4=True) == 1
    assert [node.op_type for node in model.graph.node] == [kernels.BLOCK4_OP]
    return rows_tests._kernel_session(model), w


def _unpack(packed: np.ndarray, k: int, n: int) -> np.ndarray:
    """BlockMatMul16Q4's levels back as q [K, N] (the inverse of `block_int4`'s packing)."""
    halves = np.stack([packed & 15, packed >> 4], axis=2)  # [N/16, K/4, 2 (low, high), 32]
    t = halves.reshape(n // 16, k // 32, 8, 2, 16, 2)  # [g, b, l, h, c, i]
    return t.transpose(1, 3, 2, 5, 0, 4).reshape(k, n)  # row 32 b + 16 h + 2 l + i, column 16 g + c


def _reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The product as BlockMatMul16Q4 defines it, in float64 after the integer sums: rows to int16, the grid's levels
    centred on 8, the offsets times each block's sum of a row's values."""
    k, n = w.shape
    packed, step, offset = block_int4(*grid_of(w))
    q = _unpack(packed, k, n).astype(np.int64) - 8
    s, o = (a.transpose(1, 0, 2).reshape(k // 32, n).astype(np.float64) for a in (step, offset))
    m = np.abs(x).max(-1, keepdims=True)
    xq = np.clip(np.rint(x * (np.float32(32767) / m)), -32767, 32767).astype(np.int64).reshape(len(x), k // 32, 32)
    sums = np.einsum("rbk,bkn->rbn", xq, q.reshape(k // 32, 32, n))
    return ((sums * s).sum(1) + (xq.sum(-1)[..., None] * o).sum(1)) * (m / 32767)


@pytest.mark.parametrize("symmetric", [False, True])
def test_block_int4_holds_the_grid_packed_by_nibbles(symmetric):
    w = q4_grid(np.random.default_rng(1), (96, 48), symmetric)
    packed, step, offset = block_int4(*grid_of(w))
    assert packed.shape == (3, 24, 32) and packed.dtype == np.uint8 and step.shape == offset.shape == (3, 3, 16)
    q = _unpack(packed, 96, 48).astype(np.float64) - 8
    per_row = lambda a: np.repeat(a.transpose(1, 0, 2).reshape(3, 48).astype(np.float64), 32, axis=0)  # noqa: E731
    np.testing.assert_allclose(per_row(step) * q + per_row(offset), w, rtol=1e-6, atol=1e-7)
    assert (offset == 0).all() == symmetric  # Q4_0 blocks are d (q - 8): no offsets
    g, b, line, c, i = 2, 1, 5, 7, 1  # the layout as the kernel reads it
    levels = grid_of(w)[0]  # [N, K/32, 32]
    assert packed[g, 8 * b + line, 2 * c + i] == levels[16 * g + c, b, 2 * line + i] | \
        (levels[16 * g + c, b, 16 + 2 * line + i] << 4)


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 19), k=st.sampled_from([32, 96, 192]), n=st.sampled_from([16, 48, 80]),
       seed=st.integers(0, 999), symmetric=st.booleans())
def test_a_q4_row_is_computed_by_itself_and_as_defined(rows, k, n, seed, symmetric):
    """Every row of a step equals the row alone, bit for bit (1, 2, 4 and 8-row tiles and the others), and the
    product is the int16 rows times the grid, against a float64 model of it and close to the fp32 product."""
    session, w = _grid_session(k, n, seed, symmetric)
    x = np.random.default_rng(seed + 1).standard_normal((1, rows, k), dtype=np.float32) * 3
    many = session.run(None, {"x": x})[0][0]
    for r in {0, rows // 2, rows - 1}:
        np.testing.assert_array_equal(many[r], session.run(None, {"x": x[:, r:r + 1].copy()})[0][0, 0])
    np.testing.assert_allclose(many, _reference(x[0], w), rtol=1e-5, atol=1e-4 * np.abs(many).max())
    exact = x[0].astype(np.float64) @ w
    assert np.abs(many - exact).max() <= 1e-3 * np.abs(exact).max()  # the weights are exact: only int16 rows differ


def test_a_q4_matmul_over_many_rows_takes_zero_and_nan_rows():
    session, w = _grid_session(256, 64, 4)
    x = np.random.default_rng(8).standard_normal((1, 90, 256), dtype=np.float32)
    x[0, 50] = 0.0
    x[0, 51, 9] = np.nan
    many = session.run(None, {"x": x})[0][0]
    assert (many[50] == 0).all() and np.isnan(many[51]).all() and np.isfinite(np.delete(many, 51, 0)).all()
    for r in (0, 7, 8, 45, 50, 51, 89):
        np.testing.assert_array_equal(many[r], session.run(None, {"x": x[:, r:r + 1].copy()})[0][0, 0])
    rows = np.delete(np.arange(90), [50, 51])
    np.testing.assert_allclose(many[rows], _reference(x[0, rows], w), rtol=1e-5, atol=1e-4 * np.abs(many[rows]).max())
    assert session.run(None, {"x": np.zeros((1, 0, 256), np.float32)})[0].shape == (1, 0, 64)


def test_the_amx_avx512_and_avx2_q4_paths_give_the_same_bits(tmp_path):
    """As for BlockMatMul16: the AMX, AVX-512 VNNI and AVX2 paths give every bit alike, for steps of 1 to 64 rows over
    1, 3 and 6 blocks of inputs, Q4_1 and Q4_0 blocks."""
    import onnx

    paths = []
    for k, symmetric in ((32, False), (96, True), (192, False)):
        model, _ = _grid_model(k, 80, 3, symmetric)
        quantize_rows(model, keep=lambda _name: False, wide=True, grid4=True)
        paths.append(str(tmp_path / f"q4_{k}.onnx"))
        onnx.save(model, paths[-1])
    outs, ran = int8_rows16_tests.outputs_by_path(paths)
    assert len(outs["amx"]) == int8_rows16_tests.PATH_ROWS * 80 * 4 * len(paths)
    assert outs["amx"] == outs["avx512"] == outs["avx2"]
    int8_rows16_tests.skip_unless_every_path_ran(ran)


def test_block_matmul_q4_refuses_bad_shapes():
    ones = lambda *shape: np.ones(shape, np.float32)  # noqa: E731
    message = r"BlockMatMul16Q4: x's last size K must be a positive multiple of 32, w \[N/16, K/4, 32\]"
    rows_tests.assert_refused(kernels.BLOCK4_OP, message, rows_tests.bad_block_shapes(4, 32, np.float32))
    good = rows_tests.op_session(kernels.BLOCK4_OP, 64, np.full((1, 16, 32), 0x88, np.uint8), ones(1, 2, 16),
                                 ones(1, 2, 16))  # q = 8: offsets only
    np.testing.assert_array_equal(good.run(None, {"x": np.ones((1, 64), np.float32)})[0], np.full((1, 16), 64.0))


def test_weights_off_the_grid_stay_int8_blocks():
    """``grid4`` keeps a 4-bit grid only where the weight is one: another weight (the lm_head, the heads, a model's
    weights off the grid) becomes BlockMatMul16, int8 in blocks of 32."""
    model, _ = rows_tests._rows_matmul_model(96, 48, 2)
    assert quantize_rows(model, keep=lambda _name: False, wide=True, grid4=True) == 1
    assert [n.op_type for n in model.graph.node] == [kernels.BLOCK_OP]


def test_build_options_check_int4_matmul_rows16():
    with pytest.raises(InputError, match="--int4-matmul rows16 needs --dtype int4 and --attention kernel"):
        BuildOptions(dtype="int4", int4_matmul="rows16")
    with pytest.raises(InputError, match="--int4-matmul rows16 needs --dtype int4"):
        BuildOptions(dtype="int8", attention="kernel", int4_matmul="rows16")
    with pytest.raises(InputError, match="--int4-matmul 'rows': use blocks or rows16"):
        BuildOptions(dtype="int4", attention="kernel", int4_matmul="rows")
    options = BuildOptions(dtype="int4", attention="kernel", int4_matmul="rows16")
    assert options.recipe == "int4_rows16" and options.lm_head == "screened"
    assert BuildOptions(dtype="int4", attention="kernel").lm_head == "full"  # MatMulNBits int4: no screen


def test_the_cli_refuses_int4_matmul_rows16_without_the_kernel(tmp_path):
    out = tmp_path / "art"
    proc = cli("build", "--out", str(out), "--dtype", "int4", "--int4-matmul", "rows16")
    assert_one_line_error(proc, "--int4-matmul rows16 needs --dtype int4 and --attention kernel")
    assert not out.exists() or not any(out.iterdir())


def test_a_model_off_the_grid_is_refused_before_anything_is_written(tiny_dirs, tmp_path):
    from medusa_export.exporter.build import build_artifact

    out = tmp_path / "art"
    with pytest.raises(InputError, match="this model's decoder weights are not such blocks: use --dtype int8"):
        build_artifact(str(tiny_dirs[0]), out, BuildOptions(heads=str(tiny_dirs[1]), tree=artifact_tree_file(tiny_dirs),
                                                            max_seq=64, dtype="int4", attention="kernel",
                                                            int4_matmul="rows16"), log=lambda _m: None)
    assert not out.exists() or not any(out.iterdir())
    assert not list(tmp_path.glob(".*"))  # no work directory left beside it


@pytest.fixture(scope="module")
def q4_runtimes(tiny_dirs, grid_model_dir, tmp_path_factory):
    """The tiny model on a Q4_1 grid, built fp32 and int4 rows16 (the attention kernel, the screened lm_head by
    default), 3 lanes, a chat tokenizer."""
    return engine_tests.build_runtimes((grid_model_dir, tiny_dirs[1]), tmp_path_factory.mktemp("q4rows16"),
                                       dtypes=("fp32", "int4"), attention="kernel", int4={"int4_matmul": "rows16"},
                                       tree=artifact_tree_file(tiny_dirs))


def test_int4_rows16_artifacts_record_and_hold_the_grid(q4_runtimes):
    import onnx

    rt = q4_runtimes["int4"]
    layers = rt.manifest.dims.num_layers
    for kind, graph in rt.manifest.graphs.items():
        q = graph.quantization
        assert q.name == "int4" and q.method == kernels.BLOCK4_OP and q.matmuls_left_fp == 0 and q.smooth_alpha == 0
        assert q.source_grid == 4 * layers and q.other_bits == 8  # q|k|v, o, gate|up, down per layer
        assert not q.symmetric  # Q4_1 blocks: offsets
        model = onnx.load(str(rt.generator.backend.directory / graph.file), load_external_data=False)
        ops = [n.op_type for n in model.graph.node]
        assert ops.count(kernels.BLOCK4_OP) == 4 * layers and "MatMulNBits" not in ops and "MatMul" not in ops
        assert kernels.SCREEN_OP in ops  # the lm_head: exact top words
        heads = [n.op_type for n in model.graph.node if "//heads/" in n.name and n.op_type not in ("Concat", "Add")]
        # the heads (drafts only) int8 per row: MatMulInteger's cost stays flat in the rows of a tree
        assert ("MatMulInteger" in heads) == (kind == "medusa") and kernels.BLOCK_OP not in heads
    assert rt.manifest.validation["lanes"]["exact"]


def test_int4_rows16_tree_nodes_are_bit_identical_to_one_token_steps(q4_runtimes):
    fused_tests.test_tree_step_is_bit_identical_to_plain_one_token_steps(
        q4_runtimes["fp32"], {"int4": (q4_runtimes["int4"], None)}, "int4")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=fused_tests.random_trees(fused_tests.NUM_HEADS, max_paths=fused_tests.ARTIFACT_PATHS),
       which=st.integers(0, len(TINY_PROMPTS) - 1))
def test_int4_rows16_greedy_medusa_equals_greedy_vanilla(q4_runtimes, tree, which):
    rt, prompt = q4_runtimes["int4"], TINY_PROMPTS[which]
    assert fused_tests._tokens(rt, prompt, True, tree=tree, n=16) == fused_tests._tokens(rt, prompt, False, n=16)


def test_int4_rows16_batched_answers_equal_answers_alone(q4_runtimes):
    engine_tests.test_every_answer_equals_its_answer_alone(q4_runtimes, "int4")


def test_int4_rows16_keeps_to_the_grid_models_fp32_answers_more_than_int4_blocks(q4_runtimes, tiny_dirs, grid_model_dir,
                                                                                tmp_path):
    """On the grid the weights are the model's: what is left of the difference from fp32 is the int16 rows, so the
    teacher-forced logits stay closer to fp32's than MatMulNBits' int8 activations keep them."""
    from medusa_export.exporter.build import build_artifact
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.compare import teacher_forced

    out = tmp_path / "blocks"
    build_artifact(str(grid_model_dir), out, BuildOptions(heads=str(tiny_dirs[1]), tree=artifact_tree_file(tiny_dirs),
                                                          max_seq=128, dtype="int4", max_num_seqs=1),
                   log=lambda _m: None)
    blocks = MedusaRuntime.load(out, threads=1)
    ids = [int(t) for t in np.random.default_rng(3).integers(0, blocks.manifest.dims.vocab_size, 24)]
    rows = np.arange(23)
    probs = {name: teacher_forced(rt.generator, ids).input_probs[rows, rows + 1].astype(np.float64) for name, rt in
             (("fp32", q4_runtimes["fp32"]), ("rows16", q4_runtimes["int4"]), ("blocks", blocks))}
    err = {name: np.abs(probs[name] - probs["fp32"]).max() for name in ("rows16", "blocks")}
    assert err["rows16"] < err["blocks"] / 4, err
