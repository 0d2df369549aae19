"""The attention kernel (`runtime/kernels`, `build --attention kernel`): the same results as GroupQueryAttention
within float rounding, each query row computed by itself (a row of a many-row step is bit-identical to the same row
as a one-row step), KV rows written in place or into a copy alike, bad inputs refused in one line; compiled once
per source and compiler; and artifacts built with it keep every guarantee of the GroupQueryAttention ones: tree
nodes bit-identical to one-token steps, greedy Medusa equal to greedy vanilla, batched answers equal to answers
alone, on every weight dtype. LanesAttention gives each lane of a batched step exactly RowAttention's rows; and the
int8 matmuls on activations quantized per row (`--int8-matmul rows`) compute each row by itself, with the same
guarantees on their artifacts."""

from __future__ import annotations

from pathlib import Path

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
from medusa_export.runtime.errors import BackendUnavailableError, InputError  # noqa: E402
from medusa_export.runtime.typed_json import FieldError  # noqa: E402

if [f for f in kernels.NEEDS if f not in kernels.machine_info()["flags"]]:
    pytest.skip("the attention kernel needs AVX2 and FMA", allow_module_level=True)

HEADS, KV_HEADS, HD, CAP = 6, 2, 16, 96
WIDTH = (HEADS + 2 * KV_HEADS) * HD
INV = 1 / (10000 ** (np.arange(0, HD, 2) / HD))
COS = np.cos(np.arange(CAP)[:, None] * INV[None]).astype(np.float32)
SIN = np.sin(np.arange(CAP)[:, None] * INV[None]).astype(np.float32)


def _session(kind: str, outputs=("out", "present_key", "present_value"), heads: int = HEADS, **attributes):
    """One attention node over a [1, kv_heads, CAP, hd] cache: RowAttention (with ``attributes``) or
    GroupQueryAttention."""
    inputs = ["qkv", "past_key", "past_value", "seqlens_k", "total", "cos", "sin", "position_ids", "bias"]
    if kind == "kernel":
        node = helper.make_node(kernels.OP, inputs, list(outputs), domain=kernels.DOMAIN, num_heads=heads,
                                kv_num_heads=KV_HEADS, **attributes)
    else:
        node = helper.make_node("GroupQueryAttention", [inputs[0], "", "", *inputs[1:]],
                                ["out", "present_key", "present_value"], domain="com.microsoft", num_heads=HEADS,
                                kv_num_heads=KV_HEADS, do_rotary=1)
    f, cache = TensorProto.FLOAT, [1, KV_HEADS, "capacity", HD]
    graph = helper.make_graph([node], "attention", [
        helper.make_tensor_value_info("qkv", f, [1, "S", "width"]), helper.make_tensor_value_info("past_key", f, cache),
        helper.make_tensor_value_info("past_value", f, cache),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total", TensorProto.INT32, []),
        helper.make_tensor_value_info("cos", f, [CAP, HD // 2]), helper.make_tensor_value_info("sin", f, [CAP, HD // 2]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "S"]),
        helper.make_tensor_value_info("bias", f, [1, 1, "S", "T"])],
        [v for v in (helper.make_tensor_value_info("out", f, [1, "S", HEADS * HD]),
                     helper.make_tensor_value_info("present_key", f, cache),
                     helper.make_tensor_value_info("present_value", f, cache)) if v.name in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
                                                    helper.make_opsetid(kernels.DOMAIN, 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    kernels.register(opts, kind)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def sessions():
    return {kind: _session(kind) for kind in ("kernel", "gqa")}


def _feeds(rng, rows: int, past: int, masked: float = 0.0) -> dict:
    """A step of ``rows`` causal rows after ``past`` cached ones; ``masked``: share of the past hidden by the bias."""
    bias = np.zeros((1, 1, rows, past + rows), np.float32)
    bias[..., :past][:, :, :, rng.random(past) < masked] = -np.inf
    return {"qkv": rng.standard_normal((1, rows, WIDTH), dtype=np.float32),
            "past_key": rng.standard_normal((1, KV_HEADS, CAP, HD), dtype=np.float32),
            "past_value": rng.standard_normal((1, KV_HEADS, CAP, HD), dtype=np.float32),
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
        b.bind_input(name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
        b.bind_output(out, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
    session.run_with_iobinding(b)
    return [b.copy_outputs_to_cpu()[0], cache["past_key"], cache["past_value"]]


@pytest.mark.parametrize("rows,past,masked", [(1, 0, 0.0), (2, 37, 0.0), (5, 20, 0.3), (9, 70, 0.0)])
def test_the_kernel_computes_what_group_query_attention_computes(sessions, rows, past, masked):
    feeds = _feeds(np.random.default_rng(rows + past), rows, past, masked)
    ours, theirs = _bound(sessions["kernel"], feeds), _bound(sessions["gqa"], feeds)
    np.testing.assert_allclose(ours[0], theirs[0], atol=2e-5, rtol=1e-5)
    for a, b in zip(ours[1:], theirs[1:]):  # the new rows (k rotated), and the past left as it was
        np.testing.assert_allclose(a[:, :, :past + rows], b[:, :, :past + rows], atol=1e-5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(2, 12), past=st.integers(0, 60), row=st.integers(0, 11), seed=st.integers(0, 1000))
def test_each_row_is_computed_by_itself(sessions, rows, past, row, seed):
    """Row ``row`` of a ``rows``-row step equals, bit for bit, the same row run alone after the rows before it."""
    row = min(row, rows - 1)
    feeds = _feeds(np.random.default_rng(seed), rows, past)
    out, key, value = _bound(sessions["kernel"], feeds)
    alone = dict(feeds, qkv=feeds["qkv"][:, row:row + 1].copy(), past_key=key, past_value=value,
                 seqlens_k=np.array([past + row], np.int32), total=np.array(past + row + 1, np.int32),
                 position_ids=feeds["position_ids"][:, row:row + 1].copy(),
                 bias=feeds["bias"][:, :, row:row + 1, :past + row + 1].copy())
    one = _bound(sessions["kernel"], alone)
    np.testing.assert_array_equal(one[0][0, 0], out[0, row])


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


def test_a_nan_is_passed_on_not_hidden(sessions):
    """A NaN in a key reaches the rows of the heads that read it, as in GroupQueryAttention."""
    feeds = _feeds(np.random.default_rng(4), 2, 20)
    feeds["past_key"][0, 0, 5] = np.nan  # KV head 0: query heads 0 .. 2
    ours, theirs = _bound(sessions["kernel"], feeds)[0], _bound(sessions["gqa"], feeds)[0]
    per_head = ours.reshape(2, HEADS, HD)
    assert np.isnan(per_head[:, :HEADS // KV_HEADS]).all() and np.isfinite(per_head[:, HEADS // KV_HEADS:]).all()
    assert (np.isnan(ours) == np.isnan(theirs)).all()


@pytest.mark.parametrize("outputs,heads", [(("out", "", ""), HEADS), (("out", "present_key", "present_value"), 1 << 40)])
def test_a_malformed_node_is_refused_not_run(outputs, heads):
    """A node without its cache outputs, or with absurd head counts, fails with an error (before, the first
    crashed the process)."""
    with pytest.raises(Exception) as e:
        _session("kernel", outputs, heads).run(None, _feeds(np.random.default_rng(0), 2, 10))
    assert "RowAttention" in str(e.value) or "output" in str(e.value)


# ---- LanesAttention: the lanes of a batched step in one call ------------------------------------------------------
def _lanes_session(lanes: int, node_inputs: int | None = None, extra_outputs: int = 0):
    """One LanesAttention node over ``lanes`` lanes, each with its own [1, kv_heads, CAP, hd] cache (``node_inputs``:
    give the node that many inputs instead, ``extra_outputs``: that many more outputs, to see a malformed node
    refused)."""
    f, cache = TensorProto.FLOAT, [1, KV_HEADS, "capacity", HD]
    inputs = [helper.make_tensor_value_info("qkv", f, [1, "R", WIDTH]),
              helper.make_tensor_value_info("lane_sizes", TensorProto.INT64, ["L"]),
              helper.make_tensor_value_info("cos", f, [CAP, HD // 2]), helper.make_tensor_value_info("sin", f, [CAP, HD // 2])]
    outputs = [helper.make_tensor_value_info("out", f, [1, "R", HEADS * HD])]
    for b in range(lanes):
        inputs += [helper.make_tensor_value_info(f"position_ids.{b}", TensorProto.INT64, [1, f"S{b}"]),
                   helper.make_tensor_value_info(f"bias.{b}", f, [1, 1, f"S{b}", f"T{b}"]),
                   helper.make_tensor_value_info(f"past_key.{b}", f, cache),
                   helper.make_tensor_value_info(f"past_value.{b}", f, cache)]
        outputs += [helper.make_tensor_value_info(f"present_{kind}.{b}", f, cache) for kind in ("key", "value")]
    outputs += [helper.make_tensor_value_info(f"extra.{i}", f, cache) for i in range(extra_outputs)]
    names = [i.name for i in inputs][:node_inputs]
    node = helper.make_node(kernels.LANES_OP, names, [o.name for o in outputs], domain=kernels.DOMAIN,
                            num_heads=HEADS, kv_num_heads=KV_HEADS)
    graph = helper.make_graph([node], "lanes", [i for i in inputs if i.name in names], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(kernels.DOMAIN, 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    kernels.register(opts, "kernel")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _lane_feeds(rng, shape: list[tuple[int, int]]) -> tuple[dict, list[dict]]:
    """A batched step of lanes with (rows, past) each, and each lane's one-sequence RowAttention feeds: its rows plus
    the extra row (a copy of its last, or one zero row for a lane of none), as the lanes graph's host builds them."""
    lanes_feeds, alone = {"cos": COS, "sin": SIN}, []
    qkv = []
    for b, (rows, past) in enumerate(shape):
        one = _feeds(rng, rows + 1, past, masked=0.2)
        one["qkv"][:, rows] = one["qkv"][:, rows - 1] if rows else 0.0
        one["position_ids"][:, rows] = one["position_ids"][:, rows - 1] if rows else past
        alone.append(one)
        qkv.append(one["qkv"][:, :rows])
        lanes_feeds.update({f"position_ids.{b}": one["position_ids"], f"bias.{b}": one["bias"],
                            f"past_key.{b}": one["past_key"], f"past_value.{b}": one["past_value"]})
    lanes_feeds["qkv"] = np.concatenate(qkv, axis=1)
    lanes_feeds["lane_sizes"] = np.array([rows + 1 for rows, _ in shape], np.int64)
    return lanes_feeds, alone


def _bound_lanes(session, feeds: dict, lanes: int) -> tuple[np.ndarray, list]:
    b = session.io_binding()
    b.bind_output("out", "cpu")
    caches = []
    for name, value in feeds.items():
        if not name.startswith("past_"):
            b.bind_cpu_input(name, value)
    for lane in range(lanes):
        cache = [feeds[f"past_{kind}.{lane}"].copy() for kind in ("key", "value")]
        for kind, buf in zip(("key", "value"), cache):
            b.bind_input(f"past_{kind}.{lane}", "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
            b.bind_output(f"present_{kind}.{lane}", "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
        caches.append(cache)
    session.run_with_iobinding(b)
    return b.copy_outputs_to_cpu()[0], caches


@pytest.fixture(scope="module")
def row_kernel():
    """RowAttention as the one-sequence graphs use it: the extra row skipped."""
    return _session("kernel", skip_last_row=1)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 50)), min_size=1, max_size=5), seed=st.integers(0, 999))
def test_lanes_attention_gives_each_lane_exactly_its_one_sequence_rows(row_kernel, shape, seed):
    """Every lane's rows and new KV rows are bit-identical to RowAttention's on that lane alone (with its extra row,
    as the one-sequence graph runs it), whatever the other lanes hold; a lane of no rows writes nothing. Rows up to
    40 cross the op's blocks of 32 rows."""
    feeds, alone = _lane_feeds(np.random.default_rng(seed), shape)
    out, caches = _bound_lanes(_lanes_session(len(shape)), feeds, len(shape))
    at = 0
    for (rows, past), one, (key, value) in zip(shape, alone, caches):
        ref_out, ref_key, ref_value = _bound(row_kernel, one)
        np.testing.assert_array_equal(out[0, at:at + rows], ref_out[0, :rows])
        np.testing.assert_array_equal(key[:, :, :past + rows], ref_key[:, :, :past + rows])
        np.testing.assert_array_equal(value[:, :, :past + rows], ref_value[:, :, :past + rows])
        np.testing.assert_array_equal(key[:, :, past + rows:], one["past_key"][:, :, past + rows:])  # nothing beyond
        at += rows


def test_lanes_attention_not_bound_in_place_holds_the_same():
    feeds, _ = _lane_feeds(np.random.default_rng(5), [(3, 10), (0, 0), (1, 30)])
    session = _lanes_session(3)
    copied = session.run(None, feeds)
    out, caches = _bound_lanes(session, feeds, 3)
    np.testing.assert_array_equal(copied[0], out)
    for (rows, past), (key, value), k, v in zip([(3, 10), (0, 0), (1, 30)], caches, copied[1::2], copied[2::2]):
        np.testing.assert_array_equal(k[:, :, :past + rows], key[:, :, :past + rows])
        np.testing.assert_array_equal(v[:, :, :past + rows], value[:, :, :past + rows])


@pytest.mark.parametrize("change,words", [
    (lambda f: f.update(lane_sizes=f["lane_sizes"] + 1), "do not fit each other or the"),
    (lambda f: f.update(qkv=f["qkv"][:, :-1].copy()), "do not fit each other or the"),
    (lambda f: f.update(qkv=np.concatenate([f["qkv"], f["qkv"][:, :1]], axis=1)), "do not add up"),
    (lambda f: f.update({"position_ids.1": f["position_ids.1"] + CAP}), "position is outside the rotary cache"),
    (lambda f: f.update({"bias.0": np.zeros((1, 1, 3, CAP + 4), np.float32)}), "lane 0"),  # a past beyond the cache
    (lambda f: f.update({"bias.1": f["bias.1"][..., :1, :].copy()}), "lane 1"),
    (lambda f: f.update(lane_sizes=f["lane_sizes"][:1].copy()), "12 inputs and 5 outputs for 1 lanes"),
])
def test_lanes_attention_refuses_inputs_that_do_not_fit(change, words):
    feeds, _ = _lane_feeds(np.random.default_rng(0), [(2, 5), (3, 9)])
    change(feeds)
    with pytest.raises(Exception) as e:
        _lanes_session(2).run(None, feeds)
    assert "LanesAttention: " in str(e.value) and words in str(e.value)


def test_a_lanes_node_with_more_outputs_than_its_lanes_is_refused():
    feeds, _ = _lane_feeds(np.random.default_rng(0), [(2, 5), (3, 9)])
    with pytest.raises(Exception, match="LanesAttention: 12 inputs and 6 outputs for 2 lanes"):
        _lanes_session(2, extra_outputs=1).run(None, feeds)


def test_a_lanes_node_with_a_lane_half_given_is_refused():
    with pytest.raises(Exception) as e:
        session = _lanes_session(2, node_inputs=4 + 4 + 2)
        feeds, _ = _lane_feeds(np.random.default_rng(0), [(2, 5), (3, 9)])
        session.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}})
    assert "LanesAttention" in str(e.value) or "input" in str(e.value)


def test_the_library_is_compiled_once_per_source_and_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSA_EXPORT_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_built", {})
    path = kernels.library_path()
    assert path.startswith(str(tmp_path)) and [p.name for p in tmp_path.iterdir()] == [path.split("/")[-1]]
    stamp = (tmp_path / path.split("/")[-1]).stat().st_mtime_ns
    monkeypatch.setattr(kernels, "_built", {})  # a new process: the file is reused, not compiled again
    assert kernels.library_path() == path and (tmp_path / path.split("/")[-1]).stat().st_mtime_ns == stamp


def test_without_a_compiler_a_library_compiled_before_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSA_EXPORT_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_built", {})
    path = kernels.library_path()  # compiled here, as an image build step would
    monkeypatch.setattr(kernels, "_built", {})
    monkeypatch.setattr(kernels, "_versions", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert kernels.library_path() == path
    monkeypatch.setattr(kernels, "SOURCE", tmp_path / "edited.c")  # another source: nothing to reuse
    (tmp_path / "edited.c").write_text("/* edited */\n")
    with pytest.raises(BackendUnavailableError, match="does not run"):
        kernels.library_path()


def test_no_compiler_or_a_failing_one_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSA_EXPORT_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_built", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(BackendUnavailableError, match="does not run"):
        kernels.library_path()
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'fake 1.0'\n[ \"$1\" = --version ] && exit 0\necho 'cc: fatal error' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.raises(BackendUnavailableError, match="compiling the attention kernel .* failed") as e:
        kernels.library_path()
    assert "\n" not in str(e.value) and [p.name for p in tmp_path.iterdir()] == ["cc"]  # no half-written library


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


def test_kernel_lanes_graphs_of_both_forms_pass_the_io_check():
    """A kernel artifact's lanes graph has no gather inputs now; one built before LanesAttention (one RowAttention
    call per lane) has them and still loads; a GroupQueryAttention lanes graph must have them."""
    from types import SimpleNamespace

    from medusa_export.runtime import io_table
    from medusa_export.runtime.backends.base import ModelDims
    from medusa_export.runtime.backends.ort import _ort_type, check_graph_io
    from medusa_export.runtime.errors import ArtifactError

    dims = ModelDims(num_layers=2, num_kv_heads=2, head_dim=8, vocab_size=64, num_heads=0, head_topk=4, sample_topk=4)

    def session(gathers: bool):
        args = lambda table: [SimpleNamespace(name=t.name, type=_ort_type(t.numpy_dtype(dims.dtype)),  # noqa: E731
                                              shape=[t.fixed_sizes(dims).get(i, a) for i, a in enumerate(t.axes)])
                              for t in table]
        return SimpleNamespace(get_inputs=lambda: args(io_table.lanes_inputs(2, 3, gathers)),
                               get_outputs=lambda: args(io_table.lanes_outputs(2, 3)))

    path = Path("lanes.onnx")
    for gathers in (True, False):
        check_graph_io(session(gathers), path, dims, medusa=False, lanes=3, attention="kernel")
    check_graph_io(session(True), path, dims, medusa=False, lanes=3, attention="gqa")
    with pytest.raises(ArtifactError, match="lacks the input 'lane_gather'"):
        check_graph_io(session(False), path, dims, medusa=False, lanes=3, attention="gqa")


# ---- int8 matmuls on activations quantized per row (build --int8-matmul rows) -----------------------------------
def _rows_matmul_session(k: int, n: int, seed: int = 0):
    """x [1, S, k] @ W [k, n] as `quantize_rows` writes it; W's fp32 values returned too."""
    from onnx import numpy_helper

    from medusa_export.exporter.quantize_rows import quantize_rows

    w = np.random.default_rng(seed).standard_normal((k, n), dtype=np.float32)
    f = TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], "proj")], "mm",
                              [helper.make_tensor_value_info("x", f, [1, "S", k])],
                              [helper.make_tensor_value_info("y", f, [1, "S", n])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
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


def test_a_row_quantized_matmul_takes_zero_rows_and_passes_a_nan_on():
    session, _ = _rows_matmul_session(40, 8)
    x = np.ones((1, 4, 40), np.float32)  # 32 columns in the vector path, 8 in the scalar one
    x[0, 0] = 0.0
    x[0, 2, 5] = np.nan
    x[0, 3] = 0.0
    x[0, 3, [0, 11]] = 1e-37, 5e-38  # so small that 127 / max overflows: taken as zeros
    y = session.run(None, {"x": x})[0][0]
    assert (y[0] == 0).all() and np.isfinite(y[1]).all() and np.isnan(y[2]).all() and (y[3] == 0).all()


def test_build_options_check_int8_matmul_rows():
    for bad in (dict(dtype="int8", int8_matmul="rows"), dict(dtype="fp32", attention="kernel", int8_matmul="rows")):
        with pytest.raises(InputError, match="--int8-matmul rows needs --dtype int8 and --attention kernel"):
            BuildOptions(**bad)
    with pytest.raises(InputError, match="--int8-matmul 'nibbles'"):
        BuildOptions(int8_matmul="nibbles")
    assert BuildOptions(dtype="int8", attention="kernel", int8_matmul="rows").recipe == "int8_rows"


@pytest.fixture(scope="module")
def rows_runtimes(tiny_dirs, tmp_path_factory):
    """fp32 and int8 with --int8-matmul rows, both with the attention kernel (3 lanes, a chat tokenizer)."""
    return engine_tests.build_runtimes(tiny_dirs, tmp_path_factory.mktemp("rows"), dtypes=("fp32", "int8"),
                                       int8={"int8_matmul": "rows"}, attention="kernel")


def test_row_quantized_artifacts_record_and_hold_integer_matmuls(rows_runtimes):
    import onnx

    rt = rows_runtimes["int8"]
    for kind, graph in rt.manifest.graphs.items():
        q = graph.quantization
        assert q.name == "int8" and q.method == "MatMulInteger" and q.matmuls_left_fp == 0 and q.rotation == 32
        ops = [n.op_type for n in onnx.load(str(rt.generator.backend.directory / graph.file),
                                            load_external_data=False).graph.node]
        assert ops.count("MatMulInteger") == ops.count(kernels.QUANTIZE_OP) == ops.count(kernels.SCALE_OP) >= 4 * 2
        assert ops.count("MatMulNBits") == 1  # the base lm_head, as blocks (`quantize.ROWS_BLOCKS_FOR`)


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
