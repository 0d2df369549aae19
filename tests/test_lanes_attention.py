"""LanesAttention, the attention kernel's op for batched steps (`runtime/kernels`): each lane's rows and KV rows
bit-identical to RowAttention's on that lane alone, whatever the other lanes hold; copied caches alike; malformed
nodes and inputs refused with a reason; and the lanes graphs of kernel artifacts, with and without the gather
inputs of those built before it, pass the I/O check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_attention_kernel import CAP, COS, HD, HEADS, KV_HEADS, SIN, WIDTH, _bound, _feeds, _session, ort  # noqa: E402,F401
from onnx import TensorProto, helper  # noqa: E402

from medusa_export.runtime import kernels  # noqa: E402

def _lanes_session(lanes: int, node_inputs: int | None = None, extra_outputs: int = 0, half: bool = False):
    """One LanesAttention node over ``lanes`` lanes, each with its own [1, kv_heads, CAP, hd] cache (``node_inputs``:
    give the node that many inputs instead, ``extra_outputs``: that many more outputs, to see a malformed node
    refused; ``half``: LanesAttention16 over fp16 caches)."""
    f, cache = TensorProto.FLOAT, [1, KV_HEADS, "capacity", HD]
    kv = TensorProto.FLOAT16 if half else f
    inputs = [helper.make_tensor_value_info("qkv", f, [1, "R", WIDTH]),
              helper.make_tensor_value_info("lane_sizes", TensorProto.INT64, ["L"]),
              helper.make_tensor_value_info("cos", f, [CAP, HD // 2]), helper.make_tensor_value_info("sin", f, [CAP, HD // 2])]
    outputs = [helper.make_tensor_value_info("out", f, [1, "R", HEADS * HD])]
    for b in range(lanes):
        inputs += [helper.make_tensor_value_info(f"position_ids.{b}", TensorProto.INT64, [1, f"S{b}"]),
                   helper.make_tensor_value_info(f"bias.{b}", f, [1, 1, f"S{b}", f"T{b}"]),
                   helper.make_tensor_value_info(f"past_key.{b}", kv, cache),
                   helper.make_tensor_value_info(f"past_value.{b}", kv, cache)]
        outputs += [helper.make_tensor_value_info(f"present_{kind}.{b}", kv, cache) for kind in ("key", "value")]
    outputs += [helper.make_tensor_value_info(f"extra.{i}", kv, cache) for i in range(extra_outputs)]
    names = [i.name for i in inputs][:node_inputs]
    node = helper.make_node(kernels.lanes_op(half), names, [o.name for o in outputs], domain=kernels.DOMAIN,
                            num_heads=HEADS, kv_num_heads=KV_HEADS)
    graph = helper.make_graph([node], "lanes", [i for i in inputs if i.name in names], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(kernels.DOMAIN, 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    kernels.register(opts, "kernel")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _lane_feeds(rng, shape: list[tuple[int, int]], half: bool = False) -> tuple[dict, list[dict]]:
    """A batched step of lanes with (rows, past) each, and each lane's one-sequence RowAttention feeds: its rows plus
    the extra row (a copy of its last, or one zero row for a lane of none), as the lanes graph's host builds them."""
    lanes_feeds, alone = {"cos": COS, "sin": SIN}, []
    qkv = []
    for b, (rows, past) in enumerate(shape):
        one = _feeds(rng, rows + 1, past, masked=0.2, half=half)
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
            b.bind_input(f"past_{kind}.{lane}", "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
            b.bind_output(f"present_{kind}.{lane}", "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        caches.append(cache)
    session.run_with_iobinding(b)
    return b.copy_outputs_to_cpu()[0], caches


@pytest.fixture(scope="module")
def row_kernels():
    """RowAttention and RowAttention16 as the one-sequence graphs use them: the extra row skipped."""
    return {half: _session("kernel", skip_last_row=1, half=half) for half in (False, True)}


@pytest.mark.parametrize("half", [False, True])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 50)), min_size=1, max_size=5), seed=st.integers(0, 999))
def test_lanes_attention_gives_each_lane_exactly_its_one_sequence_rows(row_kernels, half, shape, seed):
    """Every lane's rows and new KV rows are bit-identical to RowAttention's on that lane alone (with its extra row,
    as the one-sequence graph runs it), whatever the other lanes hold; a lane of no rows writes nothing. Rows up to
    40 cross the op's blocks of 32 rows. Alike over fp16 caches (LanesAttention16 against RowAttention16)."""
    row_kernel = row_kernels[half]
    feeds, alone = _lane_feeds(np.random.default_rng(seed), shape, half)
    out, caches = _bound_lanes(_lanes_session(len(shape), half=half), feeds, len(shape))
    at = 0
    for (rows, past), one, (key, value) in zip(shape, alone, caches):
        ref_out, ref_key, ref_value = _bound(row_kernel, one)
        np.testing.assert_array_equal(out[0, at:at + rows], ref_out[0, :rows])
        np.testing.assert_array_equal(key[:, :, :past + rows], ref_key[:, :, :past + rows])
        np.testing.assert_array_equal(value[:, :, :past + rows], ref_value[:, :, :past + rows])
        np.testing.assert_array_equal(key[:, :, past + rows:], one["past_key"][:, :, past + rows:])  # nothing beyond
        at += rows


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("pasts", [[0, 7, 33], [5, 64, 1, 90, 17, 40, 8, 75], [255, 256, 600, 3], [511]])
def test_decoding_lanes_computed_per_kv_head_keep_their_one_sequence_rows(row_kernels, half, pasts):
    """Lanes of one row each (a decoding step) run one work item per KV head (all its chunks of 256 keys), its query
    heads sharing the key loads; a one-row step alone goes by halves of its chunks: each lane's row and KV row still
    equal RowAttention's on that lane alone, bit for bit."""
    shape = [(1, past) for past in pasts]
    feeds, alone = _lane_feeds(np.random.default_rng(len(pasts)), shape, half)
    out, caches = _bound_lanes(_lanes_session(len(shape), half=half), feeds, len(shape))
    for lane, (one, (key, value)) in enumerate(zip(alone, caches)):
        ref_out, ref_key, ref_value = _bound(row_kernels[half], one)
        np.testing.assert_array_equal(out[0, lane], ref_out[0, 0])
        np.testing.assert_array_equal(key[:, :, :pasts[lane] + 1], ref_key[:, :, :pasts[lane] + 1])
        np.testing.assert_array_equal(value[:, :, :pasts[lane] + 1], ref_value[:, :, :pasts[lane] + 1])


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


@pytest.mark.parametrize("past, rows", [(0, 1), (1, 1), (300, 1), (7, 3), (0, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_padded_bias_is_the_causal_mask_with_the_extra_row(past, rows, dtype):
    """Each row sees the keys up to its own; the extra row (a copy of the last) sees those and its own key; one
    token (the shortcut every decoding lane takes) the same as the general construction."""
    from medusa_export.runtime.backends.ort_lanes import padded_bias

    total = past + rows + 1
    expected = np.full((rows + 1, total), -np.inf, dtype)
    for r in range(rows):
        expected[r, :past + r + 1] = 0
    expected[rows, :past + rows] = 0
    expected[rows, total - 1] = 0
    bias = padded_bias(past, rows, dtype)
    assert bias.dtype == dtype and bias.shape == (1, 1, rows + 1, total)
    np.testing.assert_array_equal(bias[0, 0], expected)
