"""int8 weights in blocks of 32 times each row as int16 (`build --int8-matmul rows16`, the kernel's BlockMatMul16,
`exporter/quantize_rows.block_int8`): the packing, the product against a numpy model of it, each row computed by
itself, the AVX2 and AVX-512 paths bit-identical, bad shapes refused; on tiny artifacts, tree nodes bit-identical to
one-token steps, greedy Medusa equal to greedy vanilla, batched answers equal to answers alone."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import test_attention_kernel  # noqa: F401 (skips this module where the kernel cannot run)
import test_engine as engine_tests  # noqa: E402
import test_fused_graph as fused_tests  # noqa: E402
import test_int8_rows as rows_tests  # noqa: E402
from conftest import TINY_PROMPTS  # noqa: E402
from test_cli import assert_one_line_error, cli  # noqa: E402

from medusa_export.exporter.quantize_rows import block_int8, quantize_rows  # noqa: E402
from medusa_export.runtime import kernels  # noqa: E402
from medusa_export.runtime.build_options import BuildOptions  # noqa: E402
from medusa_export.runtime.errors import InputError  # noqa: E402

ort = pytest.importorskip("onnxruntime")


def _wide_session(k: int, n: int, seed: int = 0, block: int = 0):
    """x [1, S, k] @ W [k, n] as `quantize_rows(wide=True)` writes it (turned per ``block`` by the graph's rotation,
    folded into the op, when ``block``); W's fp32 values returned too."""
    if block:
        model, w = rows_tests._rotated_matmul_model(k, n, block, seed)
    else:
        model, w = rows_tests._rows_matmul_model(k, n, seed)
    assert quantize_rows(model, keep=lambda _name: False, wide=True) == 1
    ops = [node.op_type for node in model.graph.node]
    assert ops == [kernels.BLOCK_OP] and len(model.graph.node[0].input) == (4 if block else 3)
    return rows_tests._kernel_session(model), w


def _reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The product as BlockMatMul16 defines it, in float64 after the integer sums: rows to int16, weights per block."""
    k, n = w.shape
    packed, scale = block_int8(w)
    w8 = packed.reshape(n // 16, k // 2, 16, 2).transpose(1, 3, 0, 2).reshape(k, n).astype(np.int64)
    s = scale.transpose(1, 0, 2).reshape(k // 32, n).astype(np.float64)
    m = np.abs(x).max(-1, keepdims=True)
    q = np.clip(np.rint(x * (np.float32(32767) / m)), -32767, 32767).astype(np.int64)
    sums = np.einsum("rbk,bkn->rbn", q.reshape(len(x), k // 32, 32), w8.reshape(k // 32, 32, n))
    return (sums * s).sum(1) * (m / 32767)


def test_block_int8_packs_sixteen_columns_by_two_inputs():
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    w[32:, 5] = 0.0  # a zero block: scale 1, zeros
    packed, scale = block_int8(w)
    assert packed.shape == (2, 32, 32) and packed.dtype == np.int8 and scale.shape == (2, 2, 16)
    g, j, c, i = 1, 7, 3, 1  # row 2 j + i, column 16 g + c
    step = np.abs(w[0:32, 16 * g + c]).max() / 127
    assert scale[g, 0, c] == np.float32(step) and scale[0, 1, 5] == 1.0 and (packed[0, 16:, 10:12] == 0).all()
    assert packed[g, j, 2 * c + i] == np.clip(np.rint(w[2 * j + i, 16 * g + c] / scale[g, 0, c]), -127, 127)
    unpacked = packed.reshape(2, 32, 16, 2).transpose(1, 3, 0, 2).reshape(64, 32) * np.repeat(
        scale.transpose(1, 0, 2).reshape(2, 32), 32, axis=0)
    assert np.abs(unpacked - w).max() <= np.abs(w).max() / 254 + 1e-6


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 19), k=st.sampled_from([32, 96, 192]), n=st.sampled_from([16, 48, 80]),
       seed=st.integers(0, 999))
def test_a_block_matmul_row_is_computed_by_itself_and_as_defined(rows, k, n, seed):
    """Every row of a step equals the row alone, bit for bit (1, 2, 4 and 8-row tiles and the others), and the
    product is the int16 rows times the int8 blocks, against a float64 model of it and close to the fp32 product."""
    session, w = _wide_session(k, n, seed)
    x = np.random.default_rng(seed + 1).standard_normal((1, rows, k), dtype=np.float32) * 3
    many = session.run(None, {"x": x})[0][0]
    for r in {0, rows // 2, rows - 1}:
        np.testing.assert_array_equal(many[r], session.run(None, {"x": x[:, r:r + 1].copy()})[0][0, 0])
    np.testing.assert_allclose(many, _reference(x[0], w), rtol=1e-5, atol=1e-4 * np.abs(many).max())
    exact = x[0] @ w
    assert np.abs(many - exact).max() <= 0.02 * np.abs(exact).max()


@pytest.mark.parametrize("block", [32, 64])
def test_a_turned_input_is_turned_inside_the_block_matmul(block):
    """The graph's rotation is folded into the op (its signs the fourth input); the product is the unturned one."""
    session, w = _wide_session(128, 48, 5, block)
    x = np.random.default_rng(6).standard_normal((1, 9, 128), dtype=np.float32)
    y = session.run(None, {"x": x})[0][0]
    exact = x[0] @ w
    assert np.abs(y - exact).max() <= 0.02 * np.abs(exact).max()
    np.testing.assert_array_equal(y[4], session.run(None, {"x": x[:, 4:5].copy()})[0][0, 0])


@pytest.mark.parametrize("block", [0, 32])
def test_a_block_matmul_over_many_rows_computes_each_row_by_itself(block):
    """Enough rows that their quantization spreads over ONNX Runtime's threads (with and without the rotation):
    each row equals the row alone and the float64 model of the product."""
    session, w = _wide_session(256, 64, 4, block)
    x = np.random.default_rng(8).standard_normal((1, 90, 256), dtype=np.float32)  # 23,040 values
    x[0, 50] = 0.0
    x[0, 51, 9] = np.nan
    many = session.run(None, {"x": x})[0][0]
    assert (many[50] == 0).all() and np.isnan(many[51]).all() and np.isfinite(np.delete(many, 51, 0)).all()
    for r in (0, 7, 8, 45, 50, 51, 89):
        np.testing.assert_array_equal(many[r], session.run(None, {"x": x[:, r:r + 1].copy()})[0][0, 0])
    if not block:
        rows = np.delete(np.arange(90), [50, 51])
        np.testing.assert_allclose(many[rows], _reference(x[0, rows], w), rtol=1e-5,
                                   atol=1e-4 * np.abs(many[rows]).max())


def test_a_block_matmul_takes_zero_rows_and_passes_a_nan_on():
    session, _ = _wide_session(64, 32)
    x = np.ones((1, 4, 64), np.float32)
    x[0, 0] = 0.0
    x[0, 2, 5] = np.nan
    x[0, 3] = 1e-39  # so small that 32767 / max overflows: taken as zeros
    y = session.run(None, {"x": x})[0][0]
    assert (y[0] == 0).all() and np.isfinite(y[1]).all() and np.isnan(y[2]).all() and (y[3] == 0).all()
    assert session.run(None, {"x": np.zeros((1, 0, 64), np.float32)})[0].shape == (1, 0, 32)


_PATHS_SCRIPT = """
import sys, numpy as np, onnxruntime as ort
from medusa_export.runtime import kernels
opts = ort.SessionOptions(); opts.intra_op_num_threads = 2; kernels.register(opts, "kernel")
for path in sys.argv[2:]:
    s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).standard_normal((1, 64, s.get_inputs()[0].shape[-1]), dtype=np.float32) * 5
    for rows in (1, 2, 3, 4, 6, 7, 8, 13, 16, 37, 64):
        sys.stdout.buffer.write(s.run(None, {"x": x[:, :rows]})[0].tobytes())
sys.stderr.write(getattr(kernels, sys.argv[1])())
"""
PATH_ROWS = 1 + 2 + 3 + 4 + 6 + 7 + 8 + 13 + 16 + 37 + 64  # the rows of the script's steps, per model
PATH_SWITCHES = {"amx": {}, "avx512": {"MEDUSA_EXPORT_KERNEL_NO_AMX": "1"}, "avx2": {"MEDUSA_EXPORT_KERNEL_AVX2": "1"}}


def outputs_by_path(paths: list[str], switches: dict[str, dict] = PATH_SWITCHES,
                    reports: str = "block_matmul_path") -> tuple[dict[str, bytes], dict[str, str]]:
    """The products of the models at ``paths`` (input x [1, S, K]) over steps of 1 to 64 rows, as bytes, under each
    of the kernel's paths (``switches``: the environment that takes each), each in a process of its own (the library
    reads the switches when it registers); and the path each process reports it took (``kernels.<reports>()``).
    Where the CPU or Linux lacks a path its run takes the next one; the test then skips, after comparing what ran."""
    names = {name for switch in switches.values() for name in switch}
    env = {k: v for k, v in os.environ.items() if k not in names}
    outs, ran = {}, {}
    for path_name, switch in switches.items():
        done = subprocess.run([sys.executable, "-c", _PATHS_SCRIPT, reports, *paths], env={**env, **switch},
                              check=True, capture_output=True, timeout=120)
        outs[path_name], ran[path_name] = done.stdout, done.stderr.decode().strip().splitlines()[-1]
    assert ran["avx2"] == "avx2" and ran["avx512"] in ("avx512", "avx2")
    assert ran.get("amx", "amx") in ("amx", ran["avx512"])
    return outs, ran


def skip_unless_every_path_ran(ran: dict[str, str]) -> None:
    if ran["avx512"] != "avx512":
        pytest.skip("this CPU has no AVX-512 VNNI: every run took the AVX2 path")
    if ran["amx"] != "amx":
        pytest.skip("no AMX here (the CPU lacks it or Linux did not grant the tile state): the AMX run took the "
                    "AVX-512 path")


def test_the_amx_avx512_and_avx2_paths_give_the_same_bits(tmp_path):
    """MEDUSA_EXPORT_KERNEL_AVX2 takes the AVX2 path on any CPU, MEDUSA_EXPORT_KERNEL_NO_AMX the AVX-512 VNNI one
    where the CPU has it; by default steps of 16 rows and more go to AMX tiles where the CPU and Linux allow them.
    Every bit of every row agrees across the paths, for steps of 1 to 64 rows (each tile size and chain count, AMX
    tiles beside VNNI rows), over 1, 3 and 6 blocks of inputs, with and without the input rotation."""
    import onnx

    paths = []
    for k, block in ((32, 0), (96, 0), (192, 0), (192, 64)):
        if block:
            model, _ = rows_tests._rotated_matmul_model(k, 80, block, 3)
        else:
            model, _ = rows_tests._rows_matmul_model(k, 80, 3)
        quantize_rows(model, keep=lambda _name: False, wide=True)
        paths.append(str(tmp_path / f"wide{k}_{block}.onnx"))
        onnx.save(model, paths[-1])
    outs, ran = outputs_by_path(paths)
    assert len(outs["amx"]) == PATH_ROWS * 80 * 4 * len(paths)
    assert outs["amx"] == outs["avx512"] == outs["avx2"]
    skip_unless_every_path_ran(ran)


def test_block_matmul_refuses_bad_shapes():
    def session(k: int, packed: np.ndarray, scale: np.ndarray, signs: np.ndarray | None = None):
        return rows_tests.op_session(kernels.BLOCK_OP, k, packed, scale, *([] if signs is None else [signs]))

    message = r"BlockMatMul16: x's last size K must be a positive multiple of 32, w \[N/16, K/2, 32\]"
    rows_tests.assert_refused(kernels.BLOCK_OP, message, (
        (48, np.zeros((1, 24, 32), np.int8), np.ones((1, 1, 16), np.float32)),  # K % 32
        (0, np.zeros((1, 0, 32), np.int8), np.ones((1, 0, 16), np.float32)),  # K = 0
        (64, np.zeros((1, 16, 32), np.int8), np.ones((1, 2, 16), np.float32)),  # K/2 != 16
        (64, np.zeros((1, 32, 32), np.int8), np.ones((2, 2, 16), np.float32)),  # groups
        (64, np.zeros((32, 32), np.int8), np.ones((1, 2, 16), np.float32)),  # w of rank 2
        (64, np.zeros((1, 32, 16), np.int8), np.ones((1, 2, 16), np.float32)),  # lines of 16
        (64, np.zeros((1, 32, 32), np.int8), np.ones((1, 2, 8), np.float32)),  # scale groups of 8
        (64, np.zeros((1, 32, 32), np.int8), np.ones((1, 3, 16), np.float32))))  # 3 blocks
    good = (64, np.zeros((1, 32, 32), np.int8), np.ones((1, 2, 16), np.float32))
    for signs in (np.ones(3, np.float32), np.ones(1, np.float32), np.ones(128, np.float32), np.ones((2, 2), np.float32)):
        with pytest.raises(Exception, match="BlockMatMul16: signs must be a float vector whose length is a power of two"):
            session(*good, signs=signs).run(None, {"x": np.ones((1, 64), np.float32)})
    no_groups = session(64, np.zeros((0, 32, 32), np.int8), np.ones((0, 2, 16), np.float32))
    assert no_groups.run(None, {"x": np.ones((1, 64), np.float32)})[0].shape == (1, 0)
    assert session(*good).run(None, {"x": np.ones((1, 64), np.float32)})[0].shape == (1, 16)


def test_a_turned_matmul_is_turned_inside_the_block_matmul_and_recorded():
    """A MatMul that ``turn`` names (as the int8 rows recipe names the base lm_head) gets its signs as the op's fourth
    input; `turned_blocks` reads them back for the manifest."""
    from medusa_export.exporter.quantize_rows import turned_blocks

    model, w = rows_tests._rows_matmul_model(128, 48, 7)
    quantize_rows(model, keep=lambda _name: False, turn=lambda name: name == "proj", turn_block=64, wide=True)
    assert [n.op_type for n in model.graph.node] == [kernels.BLOCK_OP] and turned_blocks(model.graph, bool) == [64]
    x = np.random.default_rng(9).standard_normal((1, 5, 128), dtype=np.float32)
    y = rows_tests._kernel_session(model).run(None, {"x": x})[0][0]
    assert np.abs(y - x[0] @ w).max() <= 0.02 * np.abs(x[0] @ w).max()


def test_quantize_rows_keeps_per_row_matmuls_whose_shape_does_not_fit_the_blocks():
    model, _ = rows_tests._rows_matmul_model(40, 24)  # K not a multiple of 32: RowQuantize, MatMulInteger, ScaleRows
    assert quantize_rows(model, keep=lambda _name: False, wide=True) == 1
    assert [n.op_type for n in model.graph.node] == [kernels.QUANTIZE_OP, "MatMulInteger", kernels.SCALE_OP]


def test_an_int8_or_int4_build_below_the_bar_is_pointed_to_rows16():
    from medusa_export.exporter.build_quality import below_bar_advice

    for matmul in ("blocks", "rows"):
        advice = below_bar_advice(BuildOptions(dtype="int8", attention="kernel", int8_matmul=matmul))
        assert "--int8-matmul rows16" in advice
    assert "--int4-matmul rows16" in below_bar_advice(BuildOptions(dtype="int4"))
    for options in (BuildOptions(dtype="int8", attention="kernel", int8_matmul="rows16"),
                    BuildOptions(dtype="int4", attention="kernel", int4_matmul="rows16")):
        assert below_bar_advice(options) == "prefer a higher-precision --dtype"


def test_build_options_check_int8_matmul_rows16():
    with pytest.raises(InputError, match="--int8-matmul rows16 needs --dtype int8 and --attention kernel"):
        BuildOptions(dtype="int8", int8_matmul="rows16")
    options = BuildOptions(dtype="int8", attention="kernel", int8_matmul="rows16")
    assert options.recipe == "int8_rows16" and options.lm_head == "screened"


@pytest.fixture(scope="module")
def rows16_runtimes(tiny_dirs, tmp_path_factory):
    """fp32 and int8 with --int8-matmul rows16, both with the attention kernel and the screened lm_head (the
    default), 3 lanes, a chat tokenizer."""
    return engine_tests.build_runtimes(tiny_dirs, tmp_path_factory.mktemp("rows16"), dtypes=("fp32", "int8"),
                                       int8={"int8_matmul": "rows16"}, attention="kernel")


def test_rows16_artifacts_record_and_hold_block_matmuls(rows16_runtimes):
    import onnx

    rt = rows16_runtimes["int8"]
    for graph in rt.manifest.graphs.values():
        q = graph.quantization
        assert q.name == "int8" and q.method == "BlockMatMul16" and q.matmuls_left_fp == 0 and q.smooth_alpha == 0
        model = onnx.load(str(rt.generator.backend.directory / graph.file), load_external_data=False)
        ops = [n.op_type for n in model.graph.node]
        assert ops.count(kernels.BLOCK_OP) >= 4 * 2 and "MatMulNBits" not in ops  # 4 per layer (q|k|v, o, gate|up, down)
        assert kernels.SCREEN_OP in ops  # the lm_head: exact top words


def test_rows16_tree_nodes_are_bit_identical_to_one_token_steps(rows16_runtimes):
    fused_tests.test_tree_step_is_bit_identical_to_plain_one_token_steps(
        rows16_runtimes["fp32"], {"int8": (rows16_runtimes["int8"], None)}, "int8")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=fused_tests.random_trees(fused_tests.NUM_HEADS, max_paths=fused_tests.ARTIFACT_PATHS),
       which=st.integers(0, len(TINY_PROMPTS) - 1))
def test_rows16_greedy_medusa_equals_greedy_vanilla(rows16_runtimes, tree, which):
    rt, prompt = rows16_runtimes["int8"], TINY_PROMPTS[which]
    assert fused_tests._tokens(rt, prompt, True, tree=tree, n=16) == fused_tests._tokens(rt, prompt, False, n=16)


def test_rows16_batched_answers_equal_answers_alone(rows16_runtimes):
    engine_tests.test_every_answer_equals_its_answer_alone(rows16_runtimes, "int8")
    engine_tests.test_context_drafts_in_batched_steps_change_no_answer(rows16_runtimes, "int8")


def test_the_cli_refuses_int8_matmul_rows16_without_the_kernel(tmp_path):
    out = tmp_path / "art"
    proc = cli("build", "--out", str(out), "--dtype", "int8", "--int8-matmul", "rows16")
    assert_one_line_error(proc, "--int8-matmul rows16 needs --dtype int8 and --attention kernel")
    assert not out.exists() or not any(out.iterdir())
