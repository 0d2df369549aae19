"""The attention kernel (`runtime/kernels`, `build --attention kernel`): the same results as GroupQueryAttention
within float rounding, each query row computed by itself (a row of a many-row step is bit-identical to the same row
as a one-row step), KV rows written in place or into a copy alike, bad inputs refused in one line; compiled once
per source and compiler; and artifacts built with it keep every guarantee of the GroupQueryAttention ones: tree
nodes bit-identical to one-token steps, greedy Medusa equal to greedy vanilla, batched answers equal to answers
alone, on every weight dtype. LanesAttention: tests/test_lanes_attention.py; int8 matmuls per row:
tests/test_int8_rows.py; masked tree rows and one-path kernel artifacts: tests/test_kernel_trees.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

import test_engine as engine_tests  # noqa: E402
import test_fused_graph as fused_tests  # noqa: E402
from conftest import TINY_PROMPTS, artifact_tree_file  # noqa: E402
from test_cli import assert_one_line_error, cli  # noqa: E402

from medusa_export.runtime import kernels  # noqa: E402
from medusa_export.runtime.build_options import BuildOptions  # noqa: E402
from medusa_export.runtime.errors import InputError  # noqa: E402
from medusa_export.runtime.typed_json import FieldError  # noqa: E402

if [f for f in kernels.NEEDS if f not in kernels.machine_info()["flags"]]:
    pytest.skip("the attention kernel needs AVX2, FMA and F16C", allow_module_level=True)

HEADS, KV_HEADS, HD, CAP = 6, 2, 16, 640  # room for rows of three 256-key chunks
WIDTH = (HEADS + 2 * KV_HEADS) * HD
INV = 1 / (10000 ** (np.arange(0, HD, 2) / HD))
COS = np.cos(np.arange(CAP)[:, None] * INV[None]).astype(np.float32)
SIN = np.sin(np.arange(CAP)[:, None] * INV[None]).astype(np.float32)


def _session(kind: str, outputs=("out", "present_key", "present_value"), heads: int = HEADS, half: bool = False,
             **attributes):
    """One attention node over a [1, kv_heads, CAP, hd] cache: RowAttention (with ``attributes``; ``half``:
    RowAttention16 over fp16 caches) or GroupQueryAttention."""
    inputs = ["qkv", "past_key", "past_value", "seqlens_k", "total", "cos", "sin", "position_ids", "bias"]
    if kind == "kernel":
        node = helper.make_node(kernels.row_op(half), inputs, list(outputs), domain=kernels.DOMAIN, num_heads=heads,
                                kv_num_heads=KV_HEADS, **attributes)
    else:
        node = helper.make_node("GroupQueryAttention", [inputs[0], "", "", *inputs[1:]],
                                ["out", "present_key", "present_value"], domain="com.microsoft", num_heads=HEADS,
                                kv_num_heads=KV_HEADS, do_rotary=1)
    f, cache = TensorProto.FLOAT, [1, KV_HEADS, "capacity", HD]
    kv = TensorProto.FLOAT16 if half else f
    graph = helper.make_graph([node], "attention", [
        helper.make_tensor_value_info("qkv", f, [1, "S", "width"]), helper.make_tensor_value_info("past_key", kv, cache),
        helper.make_tensor_value_info("past_value", kv, cache),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total", TensorProto.INT32, []),
        helper.make_tensor_value_info("cos", f, [CAP, HD // 2]), helper.make_tensor_value_info("sin", f, [CAP, HD // 2]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "S"]),
        helper.make_tensor_value_info("bias", f, [1, 1, "S", "T"])],
        [v for v in (helper.make_tensor_value_info("out", f, [1, "S", HEADS * HD]),
                     helper.make_tensor_value_info("present_key", kv, cache),
                     helper.make_tensor_value_info("present_value", kv, cache)) if v.name in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
                                                    helper.make_opsetid(kernels.DOMAIN, 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    kernels.register(opts, kind)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def sessions():
    return {kind: _session(kind) for kind in ("kernel", "gqa")}


def _feeds(rng, rows: int, past: int, masked: float = 0.0, half: bool = False) -> dict:
    """A step of ``rows`` causal rows after ``past`` cached ones; ``masked``: share of the past hidden by the bias;
    ``half``: fp16 caches."""
    bias = np.zeros((1, 1, rows, past + rows), np.float32)
    bias[..., :past][:, :, :, rng.random(past) < masked] = -np.inf
    return {"qkv": rng.standard_normal((1, rows, WIDTH), dtype=np.float32),
            "past_key": rng.standard_normal((1, KV_HEADS, CAP, HD), dtype=np.float32).astype(np.float16 if half else np.float32),
            "past_value": rng.standard_normal((1, KV_HEADS, CAP, HD), dtype=np.float32).astype(np.float16 if half else np.float32),
            "seqlens_k": np.array([past + rows - 1], np.int32), "total": np.array(past + rows, np.int32),
            "cos": COS, "sin": SIN, "position_ids": np.arange(past, past + rows, dtype=np.int64)[None], "bias": bias}


def _bound(session, feeds: dict) -> list[np.ndarray]:
    """Run with present bound to the past buffers (in place, as the runtime runs it); the output and the cache."""
    b = session.io_binding()
    b.bind_output("out", "cpu")  # first: outputs come back in the order of first binding
    for name, value in feeds.items():
        if name not in ("past_key", "past_value"):
            b.bind_cpu_input(name, value)
    cache = {name: feeds[name].copy() for name in ("past_key", "past_value")}
    for name, out in (("past_key", "present_key"), ("past_value", "present_value")):
        buf = cache[name]
        b.bind_input(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        b.bind_output(out, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
    session.run_with_iobinding(b)
    return [b.copy_outputs_to_cpu()[0], cache["past_key"], cache["past_value"]]


@pytest.mark.parametrize("rows,past,masked", [(1, 0, 0.0), (2, 37, 0.0), (5, 20, 0.3), (9, 70, 0.0), (1, 600, 0.3),
                                              (7, 250, 0.0), (3, 511, 0.5)])
def test_the_kernel_computes_what_group_query_attention_computes(sessions, rows, past, masked):
    feeds = _feeds(np.random.default_rng(rows + past), rows, past, masked)
    ours, theirs = _bound(sessions["kernel"], feeds), _bound(sessions["gqa"], feeds)
    np.testing.assert_allclose(ours[0], theirs[0], atol=2e-5, rtol=1e-5)
    for a, b in zip(ours[1:], theirs[1:]):  # the new rows (k rotated), and the past left as it was
        np.testing.assert_allclose(a[:, :, :past + rows], b[:, :, :past + rows], atol=1e-5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(2, 12), past=st.one_of(st.integers(0, 60), st.integers(240, 600)), row=st.integers(0, 11),
       seed=st.integers(0, 1000))
def test_each_row_is_computed_by_itself(sessions, rows, past, row, seed):
    """Row ``row`` of a ``rows``-row step equals, bit for bit, the same row run alone after the rows before it (alone,
    a row's key chunks go to the threads one by one; in a step of rows, one thread walks them)."""
    row = min(row, rows - 1)
    feeds = _feeds(np.random.default_rng(seed), rows, past)
    out, key, value = _bound(sessions["kernel"], feeds)
    np.testing.assert_array_equal(_alone(sessions["kernel"], feeds, key, value, row), out[0, row])


def _alone(session, feeds: dict, key: np.ndarray, value: np.ndarray, row: int) -> np.ndarray:
    """The output of row ``row`` of a step's feeds run as a one-row step of its own, after the rows before it
    (``key``, ``value``: the caches the whole step wrote)."""
    past = int(feeds["total"]) - feeds["qkv"].shape[1]
    one = dict(feeds, qkv=feeds["qkv"][:, row:row + 1].copy(), past_key=key, past_value=value,
               seqlens_k=np.array([past + row], np.int32), total=np.array(past + row + 1, np.int32),
               position_ids=feeds["position_ids"][:, row:row + 1].copy(),
               bias=feeds["bias"][:, :, row:row + 1, :past + row + 1].copy())
    return _bound(session, one)[0][0, 0]


def test_a_present_not_bound_in_place_holds_the_same(sessions):
    feeds = _feeds(np.random.default_rng(3), 4, 30)
    copied = sessions["kernel"].run(None, feeds)
    bound = _bound(sessions["kernel"], feeds)
    np.testing.assert_array_equal(copied[0], bound[0])
    for a, b in zip(copied[1:], bound[1:]):
        np.testing.assert_array_equal(a[:, :, :34], b[:, :, :34])
        assert not a[:, :, 34:].any()  # nothing of ONNX Runtime's earlier use of that memory
    empty = dict(feeds, past_key=feeds["past_key"][:, :, :0].copy(), past_value=feeds["past_value"][:, :, :0].copy(),
                 seqlens_k=np.array([3], np.int32), total=np.array(4, np.int32), bias=feeds["bias"][..., 30:].copy(),
                 position_ids=np.arange(4, dtype=np.int64)[None])
    out, key, _ = sessions["kernel"].run(None, empty)  # a prompt with no cache yet: present is allocated
    assert key.shape == (1, KV_HEADS, 4, HD) and np.isfinite(out).all()


@pytest.mark.parametrize("hidden", [range(0, 300), range(256, 512), range(0, 599)])
def test_rows_whose_key_chunks_are_masked_whole_or_in_part(sessions, hidden):
    """Keys go in chunks of 256; a chunk the bias hides entirely adds nothing, in one row alone or in a step of rows,
    and the rows still agree with GroupQueryAttention."""
    feeds = _feeds(np.random.default_rng(len(hidden)), 3, 600)
    feeds["bias"][..., list(hidden)] = -np.inf
    out, key, value = _bound(sessions["kernel"], feeds)
    np.testing.assert_allclose(out, _bound(sessions["gqa"], feeds)[0], atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(_alone(sessions["kernel"], feeds, key, value, 0), out[0, 0])


def test_a_chunk_far_below_the_rows_maximum_adds_nothing(sessions):
    """Keys 0 .. 255 (the first chunk) biased 100 below the others: their weights are below exp(-87), exactly 0 as in
    one softmax, so an infinite value among them adds nothing, alone or in a step of rows; a row that sees no key at
    all is 0."""
    feeds = _feeds(np.random.default_rng(11), 3, 600)
    feeds["bias"][..., :256] -= 100
    feeds["past_value"][0, :, 10] = np.inf
    out, key, value = _bound(sessions["kernel"], feeds)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(_alone(sessions["kernel"], feeds, key, value, 0), out[0, 0])
    feeds["bias"][...] = -np.inf
    assert not _bound(sessions["kernel"], feeds)[0].any()


def test_heads_of_a_row_that_weigh_different_keys_zero_keep_their_own_sums(sessions):
    """Query head 0's query 40x larger: most of its weights underflow to exactly 0 on keys its KV head's other query
    heads still weigh. Alone (decoding), a row's heads share each value load and skip such a key for that head only:
    bit-identical to the row in a step of rows, where each head goes by itself, even where the skipped key's value is
    infinite (head 0 stays finite; the heads that weigh it do not)."""
    feeds = _feeds(np.random.default_rng(9), 3, 600)
    feeds["qkv"][..., :HD] *= 40
    key = _bound(sessions["kernel"], feeds)[1]
    q, h = feeds["qkv"][0, 0, :HD], HD // 2  # row 0's head 0, turned at its position as the kernel turns it
    turned = np.concatenate([q[:h] * COS[600] - q[h:] * SIN[600], q[h:] * COS[600] + q[:h] * SIN[600]])
    feeds["past_value"][0, 0, int(np.argmin(key[0, 0, :600] @ turned))] = np.inf  # a key head 0 weighs 0
    out, key, value = _bound(sessions["kernel"], feeds)
    assert np.isfinite(out[0, 0, :HD]).all() and not np.isfinite(out[0, 0, HD:3 * HD]).all()
    for row in range(3):
        np.testing.assert_array_equal(_alone(sessions["kernel"], feeds, key, value, row), out[0, row])


@pytest.mark.parametrize("change,words", [
    (lambda f: f.update(position_ids=f["position_ids"] + CAP), "position is outside the rotary cache"),
    (lambda f: f.update(bias=f["bias"][..., 1:].copy()), "do not fit each other"),
    (lambda f: f.update(seqlens_k=np.array([0], np.int32)), "do not fit each other"),
    (lambda f: f.update(total=np.array(CAP + 5, np.int32), seqlens_k=np.array([CAP + 4], np.int32)),
     "do not fit each other"),
    (lambda f: f.update(qkv=f["qkv"][..., :-HD].copy()), "do not match the op's heads"),
])
def test_inputs_that_do_not_fit_are_refused_with_a_reason(sessions, change, words):
    feeds = _feeds(np.random.default_rng(0), 3, 10)
    change(feeds)
    with pytest.raises(Exception) as e:
        sessions["kernel"].run(None, feeds)
    assert "RowAttention: " in str(e.value) and words in str(e.value)


@pytest.mark.parametrize("rows,past,at", [(2, 20, 5), (1, 500, 300), (3, 500, 20)])
def test_a_nan_is_passed_on_not_hidden(sessions, rows, past, at):
    """A NaN in a key, in any chunk of the keys, reaches the rows of the heads that read it, as in
    GroupQueryAttention."""
    feeds = _feeds(np.random.default_rng(4), rows, past)
    feeds["past_key"][0, 0, at] = np.nan  # KV head 0: query heads 0 .. 2
    ours, theirs = _bound(sessions["kernel"], feeds)[0], _bound(sessions["gqa"], feeds)[0]
    per_head = ours.reshape(rows, HEADS, HD)
    assert np.isnan(per_head[:, :HEADS // KV_HEADS]).all() and np.isfinite(per_head[:, HEADS // KV_HEADS:]).all()
    assert (np.isnan(ours) == np.isnan(theirs)).all()


@pytest.mark.parametrize("outputs,heads", [(("out", "", ""), HEADS), (("out", "present_key", "present_value"), 1 << 40)])
def test_a_malformed_node_is_refused_not_run(outputs, heads):
    """A node without its cache outputs, or with absurd head counts, fails with an error (before, the first
    crashed the process)."""
    with pytest.raises(Exception) as e:
        _session("kernel", outputs, heads).run(None, _feeds(np.random.default_rng(0), 2, 10))
    assert "RowAttention" in str(e.value) or "output" in str(e.value)


def test_build_options_refuse_the_kernel_where_it_cannot_run():
    with pytest.raises(InputError, match="--attention kernel needs"):
        BuildOptions(attention="kernel", graph="portable")
    with pytest.raises(InputError, match="--attention kernel needs"):
        BuildOptions(attention="kernel", dtype="fp16")
    with pytest.raises(InputError, match="--attention 'flash'"):
        BuildOptions(attention="flash")


def test_a_manifest_refuses_the_kernel_on_portable_graphs():
    from manifest_samples import sample_manifest

    with pytest.raises(FieldError, match="attention"):
        sample_manifest().replace(attention="kernel")


# ---- artifacts built with the kernel ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernel_runtimes(tiny_dirs, tmp_path_factory):
    """The engine tests' artifacts (fp32, int8, int4; 3 lanes; a chat tokenizer), built with --attention kernel."""
    return engine_tests.build_runtimes(tiny_dirs, tmp_path_factory.mktemp("kernel"), attention="kernel")


def test_kernel_artifacts_record_it_and_hold_no_group_query_attention(kernel_runtimes):
    import onnx

    rt = kernel_runtimes["fp32"]
    assert rt.manifest.attention == "kernel"
    for kind, graph in rt.manifest.graphs.items():
        nodes = onnx.load(str(rt.generator.backend.directory / graph.file)).graph.node
        ops = [n.op_type for n in nodes]
        assert (kernels.LANES_OP if kind == "lanes" else kernels.OP) in ops and "GroupQueryAttention" not in ops
        if kind == "lanes":  # one call per layer on the rows where they are: nothing gathers or splits them per lane
            assert ops.count(kernels.LANES_OP) == rt.generator.backend.dims.num_layers and kernels.OP not in ops
            assert not [n.name for n in nodes if "lane_rows" in n.name or "lanes_out" in n.name]


def _quantized(runtimes) -> dict:
    return {dtype: (runtimes[dtype], None) for dtype in ("int8", "int4")}


@pytest.mark.parametrize("dtype", ["fp32", "int8", "int4"])
def test_tree_nodes_are_bit_identical_to_one_token_steps(kernel_runtimes, dtype):
    fused_tests.test_tree_step_is_bit_identical_to_plain_one_token_steps(
        kernel_runtimes["fp32"], _quantized(kernel_runtimes), dtype)


def test_greedy_medusa_equals_greedy_vanilla_on_random_trees(kernel_runtimes):
    fused_tests.test_greedy_medusa_equals_greedy_vanilla_on_every_dtype(
        fused=kernel_runtimes["fp32"], quantized=_quantized(kernel_runtimes))


@pytest.mark.parametrize("dtype", ["fp32", "int8", "int4"])
def test_batched_answers_equal_answers_alone(kernel_runtimes, dtype):
    engine_tests.test_every_answer_equals_its_answer_alone(kernel_runtimes, dtype)
    engine_tests.test_context_drafts_in_batched_steps_change_no_answer(kernel_runtimes, dtype)


def test_kernel_answers_equal_group_query_attention_answers(kernel_runtimes, artifact):
    """On the tiny prompts (wide logit margins) both attentions give the same greedy tokens."""
    from medusa_export.runtime.api import MedusaRuntime

    with MedusaRuntime.load(artifact, threads=1) as gqa:
        for prompt in TINY_PROMPTS:
            assert fused_tests._tokens(kernel_runtimes["fp32"], prompt, False) == fused_tests._tokens(gqa, prompt, False)


def test_a_kernel_build_without_a_compiler_fails_before_any_work(tmp_path):
    out = tmp_path / "art"
    proc = cli("build", "--out", str(out), "--attention", "kernel", "--corpus-drafts", "none",
               env={"MEDUSA_EXPORT_KERNEL_DIR": str(tmp_path / "kernels"), "CC": str(tmp_path / "no-such-cc")})
    assert_one_line_error(proc, "C compiler")
    assert "load model" not in proc.stdout and (not out.exists() or not any(out.iterdir()))


def test_loading_without_a_compiler_is_a_one_line_error(kernel_runtimes, tmp_path):
    directory = str(kernel_runtimes["fp32"].generator.backend.directory)
    proc = cli("generate", directory, "--prompt", "t5 t6", "--max-new-tokens", "2",
               env={"MEDUSA_EXPORT_KERNEL_DIR": str(tmp_path), "CC": str(tmp_path / "no-such-cc")})
    assert_one_line_error(proc, "C compiler")


def test_a_kernel_build_writes_nothing_outside_its_artifact(tiny_dirs, tmp_path, monkeypatch):
    """ONNX Runtime's shape inference, which cannot infer the kernel's op, would save its partial model into the
    current directory: the constant folding of kernel graphs does not use it."""
    from medusa_export.exporter.build import build_artifact

    monkeypatch.chdir(tmp_path)
    build_artifact(str(tiny_dirs[0]), tmp_path / "art", BuildOptions(heads=str(tiny_dirs[1]), max_seq=64,
                                                                     tree=artifact_tree_file(tiny_dirs),
                                                                     attention="kernel"), log=lambda _m: None)
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
