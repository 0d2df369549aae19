"""fp32 weights read as the model's own 4-bit blocks (`build --fp32-matmul blocks`, the kernel's BlockMatMulF32Q4,
`exporter/source_grid.fma_grid_of`): the packing, the weights bit for bit, the product as defined (two fma chains
per row) and each row by itself, the AVX-512 and AVX2 paths bit-identical, bad shapes refused, weights off the grid
left to MatMul; on a tiny model on a Q4_1 grid, the artifact's record, greedy Medusa equal to greedy vanilla, batched
answers equal to answers alone and the fp32 artifact's answers kept; a model off the grid refused."""

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
import test_int4_rows16 as int4_tests  # noqa: E402
from conftest import TINY_PROMPTS, artifact_tree_file  # noqa: E402
from test_cli import assert_one_line_error, cli  # noqa: E402
from test_source_grid import grid_model_dir, q4_grid  # noqa: E402,F401 (grid_model_dir: a fixture used here)

from medusa_export.exporter.source_grid import exact_f32_matmuls, fma_grid_of, grid_of  # noqa: E402
from medusa_export.runtime import kernels  # noqa: E402
from medusa_export.runtime.build_options import BuildOptions  # noqa: E402
from medusa_export.runtime.errors import ArtifactError, InputError  # noqa: E402
from medusa_export.runtime.manifest import Manifest  # noqa: E402

ort = pytest.importorskip("onnxruntime")


def _blocks_session(k: int, n: int, seed: int = 0, symmetric: bool = False):
    model, w = int4_tests._grid_model(k, n, seed, symmetric)
    assert exact_f32_matmuls(model) == 1
    assert [node.op_type for node in model.graph.node] == [kernels.BLOCK_F32_OP]
    assert "w" not in {i.name for i in model.graph.initializer}  # the fp32 weight is gone
    return rows_tests._kernel_session(model), w


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fma, emulated: the product of two float32 values is exact in x86's 64-bit-mantissa long double, and the
    sum with a float32 value rounds there only when their exponents lie more than 16 apart, where a second rounding
    to float32 could differ from one only on an exact tie (about 2^-40 of such sums)."""
    return (a.astype(np.longdouble) * b + c).astype(np.float32)


def _reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The product as BlockMatMulF32Q4 defines it: per row and column an fma chain over the even inputs and one over
    the odd ones, in order from 0, then their sum."""
    even = np.zeros((len(x), w.shape[1]), np.float32)
    odd = np.zeros_like(even)
    for k in range(0, w.shape[0], 2):
        even = _fma(x[:, k:k + 1], w[k], even)
        odd = _fma(x[:, k + 1:k + 2], w[k + 1], odd)
    return even + odd


@pytest.mark.parametrize("symmetric", [False, True])
def test_fma_grid_of_packs_the_levels_by_nibbles_and_keeps_every_weight(symmetric):
    w = q4_grid(np.random.default_rng(1), (96, 48), symmetric)
    packed, step, low = fma_grid_of(w)
    assert packed.shape == (3, 48, 16) and packed.dtype == np.uint8 and step.shape == low.shape == (3, 3, 16)
    assert step.dtype == low.dtype == np.float16  # GGUF's d and m, exact
    q = np.stack([packed & 15, packed >> 4], axis=2).transpose(1, 2, 0, 3).reshape(96, 48)  # [2 j + i, 16 g + c]
    per_input = lambda a: np.repeat(a.transpose(1, 0, 2).reshape(3, 48), 32, axis=0)  # noqa: E731
    assert np.array_equal(_fma(per_input(step), q, per_input(low)), w)  # one rounding gives every weight exactly


def test_weights_off_a_4bit_grid_stay_matmuls():
    w = q4_grid(np.random.default_rng(2), (64, 32))
    w[5, 3] = np.nextafter(w[5, 3], np.float32(1))  # one weight one step off its block's grid
    assert fma_grid_of(w) is None
    assert fma_grid_of(q4_grid(np.random.default_rng(2), (64, 24))) is None  # not whole groups of 16 columns
    d = np.float32(1 + 2 ** -20)  # a step that fp16 cannot hold: the grid exists, the op's fp16 steps cannot carry it
    levels = np.tile(np.arange(32) % 16, (16, 1)).T.astype(np.float32)  # [32 inputs, 16 columns], 0..15 each
    assert grid_of((d * levels).astype(np.float32)) is not None and fma_grid_of((d * levels).astype(np.float32)) is None
    model, _ = rows_tests._rows_matmul_model(96, 48, 2)  # Gaussian weights
    assert exact_f32_matmuls(model) == 0 and [n.op_type for n in model.graph.node] == ["MatMul"]


@pytest.mark.parametrize("k, n", [(32, 16), (96, 48), (192, 80)])
def test_one_hot_rows_give_the_weights_bit_for_bit(k, n):
    session, w = _blocks_session(k, n, 3)
    assert np.array_equal(session.run(None, {"x": np.eye(k, dtype=np.float32)[None]})[0][0], w)


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 19), k=st.sampled_from([32, 96, 192]), n=st.sampled_from([16, 48, 80]),
       seed=st.integers(0, 999), symmetric=st.booleans())
def test_a_row_is_computed_by_itself_and_as_defined(rows, k, n, seed, symmetric):
    """Every row of a step equals the row alone, bit for bit (tiles of 1 to 4 rows by two column groups, 5 to 8 rows
    by one, an odd group alone), and the product is the two fma chains, bit for bit, close to the float64 product."""
    session, w = _blocks_session(k, n, seed, symmetric)
    x = np.random.default_rng(seed + 1).standard_normal((1, rows, k), dtype=np.float32) * 3
    many = session.run(None, {"x": x})[0][0]
    for r in {0, rows // 2, rows - 1}:
        np.testing.assert_array_equal(many[r], session.run(None, {"x": x[:, r:r + 1].copy()})[0][0, 0])
    np.testing.assert_array_equal(many, _reference(x[0], w))
    exact = x[0].astype(np.float64) @ w
    assert np.abs(many - exact).max() <= 1e-5 * np.abs(exact).max()


def test_many_rows_zero_rows_and_nan_rows():
    session, w = _blocks_session(256, 64, 4)
    x = np.random.default_rng(8).standard_normal((1, 90, 256), dtype=np.float32)
    x[0, 50] = 0.0
    x[0, 51, 9] = np.nan
    many = session.run(None, {"x": x})[0][0]
    assert (many[50] == 0).all() and np.isnan(many[51]).all() and np.isfinite(np.delete(many, 51, 0)).all()
    for r in (0, 7, 8, 45, 50, 51, 89):
        np.testing.assert_array_equal(many[r], session.run(None, {"x": x[:, r:r + 1].copy()})[0][0, 0])
    assert session.run(None, {"x": np.zeros((1, 0, 256), np.float32)})[0].shape == (1, 0, 64)


def test_the_avx512_and_avx2_paths_give_the_same_bits(tmp_path):
    """MEDUSA_EXPORT_KERNEL_AVX2 takes the AVX2 path on any CPU: every bit of every row agrees with the AVX-512 path,
    for steps of 1 to 64 rows over 1, 3 and 6 blocks of inputs and an odd number of column groups."""
    import onnx

    paths = []
    for k, symmetric in ((32, False), (96, True), (192, False)):
        model, _ = int4_tests._grid_model(k, 80, 3, symmetric)
        exact_f32_matmuls(model)
        paths.append(str(tmp_path / f"f32q4_{k}.onnx"))
        onnx.save(model, paths[-1])
    outs, ran = int8_rows16_tests.outputs_by_path(paths, {"avx512": {}, "avx2": {"MEDUSA_EXPORT_KERNEL_AVX2": "1"}},
                                                  "block_f32_path")
    assert len(outs["avx2"]) == int8_rows16_tests.PATH_ROWS * 80 * 4 * len(paths)
    assert outs["avx512"] == outs["avx2"]
    if ran["avx512"] != "avx512":
        pytest.skip("this CPU has no AVX-512: both runs took the AVX2 path")


def test_block_f32_refuses_bad_shapes():
    ones = lambda *shape: np.ones(shape, np.float16)  # noqa: E731
    message = r"BlockMatMulF32Q4: x's last size K must be a positive multiple of 32, w \[N/16, K/2, 16\]"
    rows_tests.assert_refused(kernels.BLOCK_F32_OP, message, rows_tests.bad_block_shapes(2, 16, np.float16))
    good = rows_tests.op_session(kernels.BLOCK_F32_OP, 64, np.full((1, 32, 16), 0x21, np.uint8), ones(1, 2, 16),
                                 ones(1, 2, 16))  # W = 2 even, 3 odd
    np.testing.assert_array_equal(good.run(None, {"x": np.ones((1, 64), np.float32)})[0], np.full((1, 16), 160.0))


def test_build_options_check_fp32_matmul_blocks():
    with pytest.raises(InputError, match="--fp32-matmul blocks needs --dtype fp32 and --attention kernel"):
        BuildOptions(fp32_matmul="blocks")
    with pytest.raises(InputError, match="--fp32-matmul blocks needs --dtype fp32"):
        BuildOptions(dtype="int8", attention="kernel", fp32_matmul="blocks")
    with pytest.raises(InputError, match="--fp32-matmul 'rows16': use full or blocks"):
        BuildOptions(attention="kernel", fp32_matmul="rows16")
    assert BuildOptions(attention="kernel", fp32_matmul="blocks").lm_head == "screened"


def test_the_cli_refuses_fp32_matmul_blocks_without_the_kernel(tmp_path):
    out = tmp_path / "art"
    proc = cli("build", "--out", str(out), "--fp32-matmul", "blocks")
    assert_one_line_error(proc, "--fp32-matmul blocks needs --dtype fp32 and --attention kernel")
    assert not out.exists() or not any(out.iterdir())


def test_a_model_off_the_grid_is_refused_before_anything_is_written(tiny_dirs, tmp_path):
    from medusa_export.exporter.build import build_artifact

    out = tmp_path / "art"
    with pytest.raises(InputError, match="this model's decoder weights are not such blocks: use --fp32-matmul full"):
        build_artifact(str(tiny_dirs[0]), out, BuildOptions(heads=str(tiny_dirs[1]), tree=artifact_tree_file(tiny_dirs),
                                                            max_seq=64, attention="kernel", fp32_matmul="blocks"),
                       log=lambda _m: None)
    assert not out.exists() or not any(out.iterdir())
    assert not list(tmp_path.glob(".*"))  # no work directory left beside it


@pytest.fixture(scope="module")
def blocks_runtimes(tiny_dirs, grid_model_dir, tmp_path_factory):
    """The tiny model on a Q4_1 grid, built fp32 with full MatMuls and with its blocks (the attention kernel, the
    screened lm_head by default), 3 lanes, a chat tokenizer."""
    root = tmp_path_factory.mktemp("f32blocks")
    models = (grid_model_dir, tiny_dirs[1])
    tree = artifact_tree_file(tiny_dirs)
    full = engine_tests.build_runtimes(models, root / "full", dtypes=("fp32",), attention="kernel", tree=tree)
    blocks = engine_tests.build_runtimes(models, root / "blocks", dtypes=("fp32",), attention="kernel", tree=tree,
                                         fp32_matmul="blocks")
    return {"full": full["fp32"], "blocks": blocks["fp32"]}


def test_fp32_blocks_artifacts_record_and_read_the_blocks(blocks_runtimes):
    import onnx

    rt = blocks_runtimes["blocks"]
    layers = rt.manifest.dims.num_layers
    for kind, graph in rt.manifest.graphs.items():
        assert graph.quantization is None and graph.source_blocks == 4 * layers  # q|k|v, o, gate|up, down per layer
        model = onnx.load(str(rt.generator.backend.directory / graph.file), load_external_data=False)
        ops = [n.op_type for n in model.graph.node]
        assert ops.count(kernels.BLOCK_F32_OP) == 4 * layers and kernels.SCREEN_OP in ops
        assert not any(n.op_type == "MatMul" and "/layers." in n.name for n in model.graph.node)
    assert rt.manifest.validation["lanes"]["exact"]
    full = blocks_runtimes["full"].manifest
    assert all(g.source_blocks == 0 for g in full.graphs.values())
    assert all("source_blocks" not in g for g in full.to_json()["graphs"].values())  # left out: older releases read it
    assert Manifest.from_json(rt.manifest.to_json()) == rt.manifest
    with pytest.raises(ArtifactError, match="field graphs.medusa.source_blocks can be non-zero only with fp32 weights"):
        Manifest.from_json({**rt.manifest.to_json(), "attention": "gqa"})


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=fused_tests.random_trees(fused_tests.NUM_HEADS, max_paths=fused_tests.ARTIFACT_PATHS),
       which=st.integers(0, len(TINY_PROMPTS) - 1))
def test_fp32_blocks_greedy_medusa_equals_greedy_vanilla(blocks_runtimes, tree, which):
    rt, prompt = blocks_runtimes["blocks"], TINY_PROMPTS[which]
    assert fused_tests._tokens(rt, prompt, True, tree=tree, n=16) == fused_tests._tokens(rt, prompt, False, n=16)


def test_fp32_blocks_batched_answers_equal_answers_alone(blocks_runtimes):
    engine_tests.test_every_answer_equals_its_answer_alone({"fp32": blocks_runtimes["blocks"]}, "fp32")


def test_fp32_blocks_keep_the_full_fp32_answers(blocks_runtimes):
    """The same weights in fp32 arithmetic: greedy answers equal the full MatMuls' and the teacher-forced
    probabilities differ by rounding only."""
    from medusa_export.runtime.compare import teacher_forced

    full, blocks = blocks_runtimes["full"], blocks_runtimes["blocks"]
    for prompt in TINY_PROMPTS:
        assert fused_tests._tokens(blocks, prompt, False, n=24) == fused_tests._tokens(full, prompt, False, n=24)
    ids = [int(t) for t in np.random.default_rng(3).integers(0, full.manifest.dims.vocab_size, 24)]
    rows = np.arange(23)
    probs = [teacher_forced(rt.generator, ids).input_probs[rows, rows + 1].astype(np.float64) for rt in (full, blocks)]
    assert np.abs(probs[0] - probs[1]).max() < 1e-5
