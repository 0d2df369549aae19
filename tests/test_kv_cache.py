"""KV buffers: `keep` compaction (unit + property), the mask buffer, and the committed cache after real
Medusa steps against a plain forward over prompt + accepted tokens."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from medusa_export.runtime.backends.base import KVCache, MaskBuffer, ModelDims
from medusa_export.runtime.decode import DecodeStats, GenerationConfig, decode
from medusa_export.runtime.speculation import Speculation
from medusa_export.runtime.tree import Tree, load_choices
from oracle import OracleSession

DIMS = ModelDims(num_layers=2, num_kv_heads=2, head_dim=3, vocab_size=10, num_heads=0, head_topk=1, sample_topk=1)


def fill_staged(kv: KVCache, t: int, tag: int) -> None:
    """Write recognisable rows: value = tag*1000 + buffer*100 + row."""
    for b, view in enumerate(kv.stage(t)):
        for r in range(t):
            view[:, r] = tag * 1000 + b * 100 + r


# ---------------------------------------------------------------------------------------------- unit


def test_keep_compacts_accepted_rows_in_order():
    kv = KVCache(DIMS, capacity=16)
    fill_staged(kv, 4, tag=1)
    kv.keep(np.arange(4))  # prefill: contiguous, no copy
    assert kv.length == 4 and kv.staged == 0
    fill_staged(kv, 6, tag=2)
    kv.keep(np.array([0, 2, 5]))
    assert kv.length == 7
    for b, buf in enumerate(kv.buffers()):
        assert buf[0, :4, 0, 0].tolist() == [1000 + b * 100 + r for r in range(4)]  # prefix untouched
        assert buf[0, 4:7, 0, 0].tolist() == [2000 + b * 100 + r for r in (0, 2, 5)]
        assert (buf[0, 4:7] == buf[0, 4:7, :1, :1]).all()  # whole rows moved, all heads and dims
    assert [p.shape for p in kv.past()] == [(1, 7, 2, 3)] * 4


def test_keep_nothing_and_bad_rows():
    kv = KVCache(DIMS, capacity=8)
    fill_staged(kv, 3, tag=1)
    kv.keep(np.array([], np.int64))
    assert kv.length == 0
    for bad in ([1, 1], [2, 0], [3], [0, 5]):
        fill_staged(kv, 3, tag=1)
        with pytest.raises(ValueError, match="increasing"):
            kv.keep(np.array(bad))
        assert kv.length == 0


def test_layout_and_dtypes():
    kv = KVCache(replace(DIMS, dtype="float16"), capacity=5)
    assert len(kv.buffers()) == 2 * DIMS.num_layers
    assert kv.buffers()[0] is kv.keys[0] and kv.buffers()[1] is kv.values[0] and kv.buffers()[2] is kv.keys[1]
    assert kv.keys[0].shape == (1, 5, 2, 3) and kv.keys[0].dtype == np.float16


@st.composite
def keep_steps(draw):
    steps = []
    for _ in range(draw(st.integers(1, 5))):
        t = draw(st.integers(1, 6))
        rows = sorted(draw(st.sets(st.integers(0, t - 1), max_size=t)))
        steps.append((t, rows))
    return steps


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@given(steps=keep_steps())
@settings(max_examples=60, deadline=None)
def test_keep_property(backend, steps):
    """After any sequence of stage/keep, the committed rows are exactly the kept staged rows, in order."""
    alloc = None
    if backend == "torch":
        torch = pytest.importorskip("torch")
        alloc = lambda s: torch.zeros(s)  # noqa: E731
    kv = KVCache(DIMS, capacity=40, alloc=alloc)
    expected: list[int] = []
    for tag, (t, rows) in enumerate(steps, start=1):
        fill_staged(kv, t, tag)
        kv.keep(np.array(rows, np.int64))
        expected += [tag * 1000 + r for r in rows]
    assert kv.length == len(expected)
    for b, buf in enumerate(kv.buffers()):
        got = np.asarray(buf[0, : kv.length, 1, 2]).tolist()
        assert got == [e + b * 100 for e in expected]


def test_mask_buffer_builds_prefix_and_tree_and_reuses_memory():
    mb = MaskBuffer()
    tree = Tree.from_choices([(0,), (1,), (0, 0)], topk=2).mask
    m = mb.build(3, tree)
    assert m.shape == (1, 1, 4, 7) and m.dtype == bool and m.flags["C_CONTIGUOUS"]
    assert m[0, 0, :, :3].all()
    np.testing.assert_array_equal(m[0, 0, :, 3:], tree)
    buf = mb.buffer
    m2 = mb.build(1, np.ones((1, 1), bool))  # smaller: same memory, stale cells not visible
    assert mb.buffer is buf and m2.shape == (1, 1, 1, 2) and m2.all()
    m3 = mb.build(5, np.tri(3, dtype=bool))
    assert mb.buffer is buf  # 3 * 8 = 24 <= 28
    np.testing.assert_array_equal(m3[0, 0, :, 5:], np.tri(3, dtype=bool))
    assert m3[0, 0, :, :5].all()
    mb.build(20, tree)
    assert mb.buffer.size >= 4 * 24


# ---------------------------------------------------------------------------------------------- real model


def hf_kv(model, ids: list[int]):
    """Per-layer (keys, values) of one plain forward, sequence-major [1, L, kv_heads, head_dim]."""
    import torch

    with torch.inference_mode():
        out = model(torch.tensor([ids]), use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values  # named `cache` in later transformers 5.x releases
    return [(layer.keys.transpose(1, 2), layer.values.transpose(1, 2)) for layer in cache.layers]


def run_chunks(session, prompt, tree, min_tokens):
    """Greedy decoding with step costs pinned, rows free (`ClockFreeCost`): every step verifies the heads' tree,
    whatever this machine's timings (a fresh process measures its one-row step first; with measured costs a short
    run on a busy machine verified too few trees for the oracle's long acceptances)."""
    from conftest import ClockFreeCost

    stats = DecodeStats()
    spec = Speculation()
    spec.alone_cost = {True: ClockFreeCost(row_share=0.0), False: ClockFreeCost(row_share=0.0)}
    out = []
    for chunk in decode(session, prompt, tree, GenerationConfig(medusa=tree is not None), stats, spec):
        out += chunk
        if len(out) >= min_tokens:
            break
    return out, stats


CASES = [
    ("cpu_small_10", 4, "shared", None),  # random heads: mostly short acceptances
    ("mc_sim_7b_63", 4, "own", None),
    ("cpu_small_10", 4, "shared", 1),  # oracle at rank 1: long accepted paths through second children
    ([(0,), (1,), (2,), (1, 0), (1, 1), (1, 1, 0), (1, 1, 1)], 3, "own", 1),
]


@pytest.mark.parametrize("spec, k, layout, oracle_rank", CASES)
def test_committed_kv_equals_plain_forward(tiny, spec, k, layout, oracle_rank):
    torch = pytest.importorskip("torch")
    backend = tiny.backend(k, layout, max_seq=128)
    tree = Tree.from_choices(load_choices(spec), topk=10, num_heads=k)
    for prompt in ([5, 6, 7, 8, 9], [100, 200, 300, 17, 17, 17, 42]):
        session = backend.new_session()
        if oracle_rank is not None:
            session = OracleSession(session, list(prompt) + tiny.reference(prompt, 40), rank=oracle_rank)
        tokens, stats = run_chunks(session, list(prompt), tree, 20)
        assert tokens == tiny.reference(prompt, len(tokens))
        if oracle_rank is not None:
            assert stats.mean_accepted > 1.5
        inner = session.inner if oracle_rank is not None else session
        # The bonus token of the last step has no KV row yet.
        seq = list(prompt) + tokens[:-1]
        assert inner.length == len(seq)
        ref = hf_kv(tiny.model, seq)
        for layer, (rk, rv) in enumerate(ref):
            got_k = inner.kv.keys[layer][:, : inner.length]
            got_v = inner.kv.values[layer][:, : inner.length]
            torch.testing.assert_close(got_k, rk, atol=1e-5, rtol=0)
            torch.testing.assert_close(got_v, rv, atol=1e-5, rtol=0)


def test_vanilla_kv_equals_plain_forward(tiny):
    torch = pytest.importorskip("torch")
    backend = tiny.backend(None)
    prompt = [1, 2, 3]
    session = backend.new_session(64)
    tokens, _ = run_chunks(session, prompt, None, 12)
    ref = hf_kv(tiny.model, prompt + tokens[:-1])
    for layer, (rk, rv) in enumerate(ref):
        torch.testing.assert_close(session.kv.keys[layer][:, : session.length], rk, atol=1e-5, rtol=0)
        torch.testing.assert_close(session.kv.values[layer][:, : session.length], rv, atol=1e-5, rtol=0)


def test_step_model_matches_hf_with_empty_past(tiny):
    """The exported graph's wrapper gives the same logits argmax and KV as the HF model."""
    torch = pytest.importorskip("torch")
    from medusa_export.exporter.step_model import StepModel

    ids = [5, 6, 7, 8, 9, 10]
    n = len(ids)
    cfg = tiny.model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    past = [torch.zeros(1, 0, cfg.num_key_value_heads, hd) for _ in range(2 * cfg.num_hidden_layers)]
    step = StepModel(tiny.model, tiny.heads(2), head_topk=4, sample_topk=5)
    with torch.inference_mode():
        outs = step(torch.tensor([ids]), torch.arange(n).view(1, n),
                    torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n), torch.tensor([1.0]), *past)
        logits = tiny.model(torch.tensor([ids])).logits[0]
    top_ids, top_p, input_probs, entropy, medusa_ids = outs[:5]
    assert top_ids.shape == (1, n, 5) and medusa_ids.shape == (1, n, 2, 4)
    assert top_ids[0, :, 0].tolist() == logits.argmax(-1).tolist()
    probs = logits.softmax(-1)
    torch.testing.assert_close(top_p[0], torch.gather(probs, 1, top_ids[0]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(input_probs[0], probs[:, ids], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(entropy[0], -(probs * probs.log()).sum(-1), atol=1e-5, rtol=1e-5)
    for layer, (rk, rv) in enumerate(hf_kv(tiny.model, ids)):
        torch.testing.assert_close(outs[5 + 2 * layer], rk, atol=1e-5, rtol=0)
        torch.testing.assert_close(outs[6 + 2 * layer], rv, atol=1e-5, rtol=0)
