"""The screened fp32 lm_head (`build --lm-head screened`, `exporter/screened_lm_head.py`, the kernel's ScreenedVocab):
the top words in the exact order of fp32 logits and the distribution close to the fp32 softmax, each row computed by
itself, bad inputs refused; on tiny artifacts, greedy Medusa equal to greedy vanilla, tree nodes bit-identical to
one-token steps, batched answers equal to answers alone, and greedy answers equal to those of the full lm_head."""

from __future__ import annotations

import numpy as np
import pytest

import test_attention_kernel  # noqa: F401 (skips this module where the kernel cannot run)
import test_engine as engine_tests  # noqa: E402
import test_fused_graph as fused_tests  # noqa: E402
from conftest import TINY_PROMPTS  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from test_cli import assert_one_line_error, cli  # noqa: E402

from medusa_export.exporter.screened_lm_head import HEADS_SCOPE  # noqa: E402
from medusa_export.runtime import kernels  # noqa: E402
from medusa_export.runtime.build_options import BuildOptions  # noqa: E402
from medusa_export.runtime.errors import InputError  # noqa: E402

ort = pytest.importorskip("onnxruntime")
TOP = 8
F = TensorProto.FLOAT


def _tail_model(w: np.ndarray, input_probs: bool = True):
    """The traced tail's base reduction (MatMul, Cast, TopK, LogSoftmax at a temperature ...) over weight w [H, V]."""
    nodes = [helper.make_node("MatMul", ["hidden", "w"], ["logits"], "lm_head"),
             helper.make_node("Cast", ["logits"], ["lf"], "cast", to=F),
             helper.make_node("TopK", ["lf", "k"], ["top_values", "next_token_ids"], "topk"),
             helper.make_node("Div", ["lf", "temperature"], ["scaled"], "div"),
             helper.make_node("LogSoftmax", ["scaled"], ["logp"], "log_softmax"),
             helper.make_node("Exp", ["logp"], ["p"], "exp"),
             helper.make_node("GatherElements", ["p", "next_token_ids"], ["next_token_probs"], "top_probs", axis=2),
             helper.make_node("Mul", ["p", "logp"], ["plogp"], "mul"),
             helper.make_node("ReduceSum", ["plogp", "axis"], ["minus_entropy"], "sum", keepdims=0),
             helper.make_node("Neg", ["minus_entropy"], ["entropy"], "neg")]
    outputs = [("next_token_ids", TensorProto.INT64), ("next_token_probs", F), ("entropy", F)]
    inputs = [helper.make_tensor_value_info("hidden", F, ["B", "R", w.shape[0]]),
              helper.make_tensor_value_info("temperature", F, [1])]
    if input_probs:  # p at every input token: [B, R, T]
        nodes += [helper.make_node("Unsqueeze", ["input_ids", "one"], ["ids3"], "unsqueeze"),
                  helper.make_node("Shape", ["p"], ["p_shape"], "p_shape", start=1, end=2),
                  helper.make_node("Shape", ["input_ids"], ["ids_shape"], "ids_shape"),
                  helper.make_node("Split", ["ids_shape"], ["b", "t"], "split", axis=0, num_outputs=2),
                  helper.make_node("Concat", ["b", "p_shape", "t"], ["expand_to"], "concat", axis=0),
                  helper.make_node("Expand", ["ids3", "expand_to"], ["ids_rows"], "expand"),
                  helper.make_node("GatherElements", ["p", "ids_rows"], ["input_token_probs"], "in_probs", axis=2)]
        outputs.insert(2, ("input_token_probs", F))
        inputs.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "T"]))
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([TOP], np.int64), "k"),
             numpy_helper.from_array(np.array([-1], np.int64), "axis"),
             numpy_helper.from_array(np.array([1], np.int64), "one")]
    graph = helper.make_graph(nodes, "tail", inputs, [helper.make_tensor_value_info(n, t, None) for n, t in outputs],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _session(model, threads: int = 2):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    kernels.register(opts, "kernel")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _screened(w: np.ndarray, input_probs: bool = True, threads: int = 2):
    from medusa_export.exporter.screened_lm_head import screen_lm_head

    model = _tail_model(w, input_probs)
    screen_lm_head(model, TOP)
    ops = [n.op_type for n in model.graph.node]
    assert ops == [kernels.QUANTIZE_OP, "MatMulInteger", kernels.SCALE_OP, kernels.SCREEN_OP]
    assert "w" not in {i.name for i in model.graph.initializer}  # the fp32 [H, V] product is gone
    return _session(model, threads)


def _weights(h: int, v: int, seed: int, outliers: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((h, v)).astype(np.float32) * 0.1
    if outliers:  # a few large entries per column: a coarse int8 grid for the rest of it
        w[rng.integers(0, h, v), np.arange(v)] *= 40
    return w


def _feed(rows: np.ndarray, ids: np.ndarray | None = None, temperature: float = 1.0) -> dict:
    feed = {"hidden": rows, "temperature": np.array([temperature], np.float32)}
    if ids is not None:
        feed["input_ids"] = ids
    return feed


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 6), outliers=st.booleans(),
       temperature=st.sampled_from([0.5, 1.0, 1.7]))
def test_the_top_words_are_those_of_exact_fp32_logits(seed, rows, outliers, temperature):
    h, v = 67, 1003  # neither a multiple of 8 nor 32: the ops' scalar tails too
    w = _weights(h, v, seed, outliers)
    rng = np.random.default_rng(seed + 1)
    x = (rng.standard_normal((2, rows, h)) * rng.uniform(0.5, 8)).astype(np.float32)
    x[..., rng.integers(0, h)] *= 10  # an outlier feature, as real hidden states have
    ids = rng.integers(0, v, (2, 5))
    got = _screened(w).run(None, _feed(x, ids, temperature))
    exact = x.astype(np.float64) @ w.astype(np.float64)  # [2, R, V]
    order = np.argsort(-exact, axis=-1, kind="stable")[..., :TOP + 1]
    gaps = -np.diff(np.take_along_axis(exact, order, -1), axis=-1)  # between rank i and i + 1
    clear = gaps[..., :TOP] > 1e-5 * np.abs(exact).max()  # ranks not tied within float rounding
    assert (got[0][clear] == order[..., :TOP][clear]).all()
    assert clear.mean() > 0.8  # nearly every rank checked, the argmax (rank 0) among them unless tied
    logp = exact / temperature
    logp -= logp.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    p = np.exp(logp)
    np.testing.assert_allclose(got[1], np.take_along_axis(p, got[0], -1), atol=2e-3)
    np.testing.assert_allclose(got[2], np.take_along_axis(p, np.broadcast_to(ids[:, None], (2, rows, 5)), -1), atol=2e-3)
    np.testing.assert_allclose(got[3], -(p * logp).sum(-1), atol=2e-2)


def test_each_row_is_computed_by_itself():
    h, v = 64, 1000
    w = _weights(h, v, 3)
    rows = (np.random.default_rng(4).standard_normal((1, 9, h)) * 3).astype(np.float32)
    many = _screened(w, input_probs=False, threads=2).run(None, _feed(rows))
    one = _screened(w, input_probs=False, threads=1)
    for r in range(rows.shape[1]):
        alone = one.run(None, _feed(rows[:, r:r + 1]))
        for a, b in zip(many, alone):
            assert np.array_equal(a[:, r], b[:, 0])  # bit for bit


def test_a_temperature_per_row_is_each_rows_own():
    """The lanes graph gives one temperature per row: each row's outputs equal the row alone at its temperature."""
    from medusa_export.exporter.screened_lm_head import screen_lm_head

    w = _weights(48, 300, 8)
    model = _tail_model(w, input_probs=False)
    model.graph.input[1].CopyFrom(helper.make_tensor_value_info("temperature", F, ["B", "R"]))
    screen_lm_head(model, TOP)
    per_row = _session(model)
    rows = (np.random.default_rng(9).standard_normal((1, 3, 48)) * 4).astype(np.float32)
    temperatures = np.array([[0.5, 1.0, 2.0]], np.float32)
    together = per_row.run(None, {"hidden": rows, "temperature": temperatures})
    for r in range(3):
        alone = per_row.run(None, {"hidden": rows[:, r:r + 1], "temperature": temperatures[:, r:r + 1]})
        for a, b in zip(together, alone):
            assert np.array_equal(a[:, r], b[:, 0])
    hotter = per_row.run(None, {"hidden": rows[:, :1], "temperature": temperatures[:, 2:]})
    assert not np.allclose(together[1][0, 0], hotter[1][0, 0])  # row 0 took its own temperature, not row 2's
    with pytest.raises(Exception, match="temperature one value or one per row"):
        per_row.run(None, {"hidden": rows, "temperature": temperatures[:, :2]})


def test_zero_and_nan_rows_pass_through():
    w = _weights(32, 200, 5)
    rows = np.zeros((1, 2, 32), np.float32)
    rows[0, 1, 3] = np.nan
    ids, probs, entropy = _screened(w, input_probs=False).run(None, _feed(rows))
    assert list(ids[0, 0]) == list(range(TOP))  # equal logits: the smaller id first
    np.testing.assert_allclose(probs[0, 0], 1 / 200, rtol=1e-5)
    assert abs(entropy[0, 0] - np.log(200)) < 1e-3
    assert list(ids[0, 1]) == list(range(TOP)) and np.isnan(probs[0, 1]).all()  # NaN logits: by id, after numbers


def test_a_step_without_output_rows_returns_empty_outputs():
    ids, probs, entropy = _screened(_weights(32, 200, 5), input_probs=False).run(None, _feed(np.zeros((1, 0, 32), np.float32)))
    assert ids.shape == probs.shape == (1, 0, TOP) and entropy.shape == (1, 0)


def test_only_words_within_reach_of_the_top_are_computed_exactly():
    """A word whose bound puts it out of reach keeps the int8 product's logit: give its fp32 row huge values (which an
    exact product over every word would rank first) and nothing changes."""
    from medusa_export.exporter.screened_lm_head import PREFIX, screen_lm_head

    h, v = 64, 500
    w = _weights(h, v, 11)
    x = (np.random.default_rng(12).standard_normal((1, 1, h)) * 3).astype(np.float32)
    lowest = int(np.argmin(x[0, 0] @ w))  # far below the top 8 of a 500-word row
    model = _tail_model(w, input_probs=False)
    screen_lm_head(model, TOP)
    before = _session(model).run(None, _feed(x))
    rows = next(i for i in model.graph.initializer if i.name == f"{PREFIX}/weight_rows")
    changed = numpy_helper.to_array(rows).copy()
    changed[lowest] = 1e4 * np.sign(x[0, 0])
    rows.CopyFrom(numpy_helper.from_array(changed, rows.name))
    after = _session(model).run(None, _feed(x))
    for a, b in zip(before, after):
        assert np.array_equal(a, b)
    changed[int(before[0][0, 0, 0])] = 1e4 * np.sign(x[0, 0])  # the top word's own row: it is computed exactly
    rows.CopyFrom(numpy_helper.from_array(changed, rows.name))
    assert _session(model).run(None, _feed(x))[1][0, 0, 0] > before[1][0, 0, 0]


def test_the_int8_products_are_exact_where_pairs_would_clip_in_16_bits():
    """Rows of large same-sign values (uint8 255) against columns of 127 (or -127) throughout: on x86 CPUs without
    VNNI, ONNX Runtime's uint8 x int8 kernel would clip each pair, 2 x 255 x 127, to 16 bits unless the session asks
    for exact products (`kernels.register` does there, and only there); the bound needs the exact integer sums."""
    import onnxruntime

    opts = onnxruntime.SessionOptions()
    kernels.register(opts, "kernel")
    try:
        asked = opts.get_session_config_entry(kernels.EXACT_INT8_PRODUCTS[0]) == kernels.EXACT_INT8_PRODUCTS[1]
    except RuntimeError:  # not set
        asked = False
    assert asked == kernels.clipping_int8_products()  # only where the CPU clips: elsewhere it would only cost time
    h, v = 64, 64
    w = np.full((h, v), 0.5, np.float32)
    w[:, ::2] *= -1  # each column one value, its peak: 127 (or -127) all the way down
    x = np.ones((1, 2, h), np.float32)
    x[0, 1] = -1  # a row of 255s (uint8) and one of 1s
    model = _tail_model(w, input_probs=False)
    from medusa_export.exporter.screened_lm_head import PREFIX, screen_lm_head

    screen_lm_head(model, TOP)
    del model.graph.output[:]
    model.graph.output.extend([helper.make_tensor_value_info(f"{PREFIX}/approx", F, None)])
    approx = _session(model).run(None, {"hidden": x, "temperature": np.ones(1, np.float32)})[0]
    np.testing.assert_allclose(approx, x @ w, rtol=1e-5, atol=1e-4)


def test_the_op_refuses_bad_shapes_and_ids():
    w = _weights(32, 200, 6)
    s = _screened(w)
    rows = np.ones((1, 2, 32), np.float32)
    with pytest.raises(Exception, match="outside the vocabulary"):
        s.run(None, _feed(rows, np.array([[3, 200]])))
    with pytest.raises(Exception, match="input_ids"):
        s.run(None, _feed(rows, np.array([[3], [4]])))  # two batches of ids, one of rows


def test_build_options_check_lm_head():
    for bad in ({"lm_head": "screened"}, {"lm_head": "screened", "attention": "kernel", "dtype": "int8"},
                {"lm_head": "screened", "attention": "kernel", "dtype": "int4"}):
        with pytest.raises(InputError, match="--lm-head screened needs --attention kernel and --dtype fp32"):
            BuildOptions(**bad)
    BuildOptions(lm_head="screened", attention="kernel", dtype="int8", int8_matmul="rows")
    auto = {(dtype, attention, matmul): BuildOptions(dtype=dtype, attention=attention, int8_matmul=matmul).lm_head
            for dtype, attention, matmul in (("fp32", "kernel", "blocks"), ("int8", "kernel", "rows"),
                                             ("int8", "kernel", "blocks"), ("int4", "kernel", "blocks"),
                                             ("fp32", "gqa", "blocks"), ("int8", "gqa", "blocks"))}
    assert auto == {("fp32", "kernel", "blocks"): "screened", ("int8", "kernel", "rows"): "screened",
                    ("int8", "kernel", "blocks"): "full", ("int4", "kernel", "blocks"): "full",
                    ("fp32", "gqa", "blocks"): "full", ("int8", "gqa", "blocks"): "full"}  # auto: screened where it can
    with pytest.raises(InputError, match="--lm-head 'tiny'"):
        BuildOptions(lm_head="tiny")


def test_the_cli_refuses_a_screened_lm_head_without_the_kernel(tmp_path):
    out = tmp_path / "art"
    proc = cli("build", "--out", str(out), "--lm-head", "screened")
    assert_one_line_error(proc, "--lm-head screened needs --attention kernel and --dtype fp32")
    assert not out.exists() or not any(out.iterdir())


@pytest.fixture(scope="module")
def screened_runtimes(tiny_dirs, tmp_path_factory):
    """fp32 with the attention kernel, the lm_head full and screened; int8 rows screened (3 lanes, a chat tokenizer)."""
    full = engine_tests.build_runtimes(tiny_dirs, tmp_path_factory.mktemp("full"), dtypes=("fp32",), attention="kernel",
                                       lm_head="full")
    screened = engine_tests.build_runtimes(tiny_dirs, tmp_path_factory.mktemp("screened"), dtypes=("fp32", "int8"),
                                           int8={"int8_matmul": "rows"}, attention="kernel", lm_head="screened")
    return {"full": full["fp32"], **screened}


def test_screened_artifacts_record_it_and_hold_no_fp32_vocabulary_product(screened_runtimes):
    import onnx

    assert screened_runtimes["full"].manifest.lm_head == "full"
    for rt, graph in [(rt, g) for rt in (screened_runtimes["fp32"], screened_runtimes["int8"])
                      for g in rt.manifest.graphs.values()]:
        assert rt.manifest.lm_head == "screened"
        vocab, hidden = rt.manifest.dims.vocab_size, rt.manifest.model.hidden_size
        model = onnx.load(str(rt.generator.backend.directory / graph.file))
        assert [n.op_type for n in model.graph.node].count(kernels.SCREEN_OP) == 1
        if rt.manifest.quantized:  # the screen's product is the only int8 one on the lm_head's input
            assert graph.quantization.lm_head_rotation == 0
        assert not any(tuple(i.dims) == (hidden, vocab) and i.data_type == F for i in model.graph.initializer)
        heads = [n.op_type for n in model.graph.node if HEADS_SCOPE in n.name and n.op_type.startswith("MatMul")]
        assert bool(heads) == (graph.file == "medusa.onnx")
        assert set(heads) <= {"MatMulInteger"}  # the heads' matmuls int8 per row (they only propose drafts)
    fp32 = screened_runtimes["fp32"].manifest.validation
    assert fp32["medusa"]["approximate"] == ["medusa_token_ids"]  # recorded against PyTorch, not held to fp32's bar
    assert fp32["medusa"]["max_abs_error"]["next_token_probs"] <= fp32["medusa"]["tolerance"]


def test_the_manifest_records_the_lm_head_and_checks_it(screened_runtimes):
    from medusa_export.runtime.errors import ArtifactError
    from medusa_export.runtime.manifest import Manifest

    screened, full = screened_runtimes["fp32"].manifest, screened_runtimes["full"].manifest
    assert screened.to_json()["lm_head"] == "screened" and Manifest.from_json(screened.to_json()) == screened
    assert "lm_head" not in full.to_json()  # left out: releases before the field read the artifact
    assert Manifest.from_json(full.to_json()).lm_head == "full"
    with pytest.raises(ArtifactError, match="field lm_head can be 'screened' only with fp32, int8 or int4 weights"):
        Manifest.from_json({**screened.to_json(), "attention": "gqa"})


def test_screened_greedy_answers_equal_the_full_lm_heads(screened_runtimes):
    for prompt in TINY_PROMPTS:
        assert (fused_tests._tokens(screened_runtimes["fp32"], prompt, False, n=24)
                == fused_tests._tokens(screened_runtimes["full"], prompt, False, n=24))


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_screened_tree_nodes_are_bit_identical_to_one_token_steps(screened_runtimes, dtype):
    fused_tests.test_tree_step_is_bit_identical_to_plain_one_token_steps(
        screened_runtimes["fp32"], {"int8": (screened_runtimes["int8"], None)}, dtype)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=fused_tests.random_trees(fused_tests.NUM_HEADS, max_paths=fused_tests.ARTIFACT_PATHS),
       which=st.integers(0, len(TINY_PROMPTS) - 1), dtype=st.sampled_from(["fp32", "int8"]))
def test_screened_greedy_medusa_equals_greedy_vanilla(screened_runtimes, tree, which, dtype):
    rt, prompt = screened_runtimes[dtype], TINY_PROMPTS[which]
    assert fused_tests._tokens(rt, prompt, True, tree=tree, n=16) == fused_tests._tokens(rt, prompt, False, n=16)


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_screened_batched_answers_equal_answers_alone(screened_runtimes, dtype):
    engine_tests.test_every_answer_equals_its_answer_alone(screened_runtimes, dtype)
    engine_tests.test_context_drafts_in_batched_steps_change_no_answer(screened_runtimes, dtype)
