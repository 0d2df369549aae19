"""The attention kernel over tree steps: a row of a masked branching tree (its ancestors' keys with masked siblings'
keys between them) is bit-identical to plain decoding of its path while its keys stay in their 256-key chunks, and
a kernel artifact of one path still verifies one path per step (docs/graphs.md, exact tree verification). The
kernel's other guarantees: tests/test_attention_kernel.py."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import test_attention_kernel as kernel_tests  # its module-level skip (no AVX2 / FMA / F16C) skips this one too
import test_engine as engine_tests
from conftest import TINY_PROMPTS

_bound, _feeds, _session = kernel_tests._bound, kernel_tests._feeds, kernel_tests._session


@functools.lru_cache(maxsize=2)
def _kernel_session(half: bool):
    """One RowAttention session per cache dtype for a hypothesis test's examples (no function-scoped fixtures)."""
    return _session("kernel", half=half)


@settings(max_examples=30, deadline=None)
@given(parents=st.lists(st.integers(0, 1000), min_size=1, max_size=11), past=st.one_of(st.integers(0, 40),
       st.integers(256, 300)), half=st.booleans(), seed=st.integers(0, 1000))
def test_a_masked_tree_row_is_bit_identical_to_plain_decoding_of_its_path(parents, past, half, seed):
    """A branching tree verified in one masked step (its rows after the past, each seeing its ancestors' keys with
    masked siblings' between them, at the position of its depth): every row's output and K / V rows are, bit for
    bit, those of a one-row step over a cache holding its path side by side, as plain decoding has it (the rows
    lying within one chunk of 256 keys)."""
    session = _kernel_session(half)
    parent = [-1] + [p % (i + 1) for i, p in enumerate(parents)]  # node i + 1's parent: any earlier node
    rows = len(parent)
    depth = [0] * rows
    for i in range(1, rows):
        depth[i] = depth[parent[i]] + 1
    seen = np.eye(rows, dtype=bool)
    for i in range(1, rows):
        seen[i] |= seen[parent[i]]
    feeds = _feeds(np.random.default_rng(seed), rows, past, half=half)
    feeds["bias"][0, 0, :, past:][~seen] = -np.inf
    feeds["position_ids"] = (past + np.array(depth, np.int64))[None]
    out, key, value = _bound(session, feeds)
    for r in range(rows):
        path = [i for i in range(rows) if seen[r, i]]  # root .. r, in order
        k, v = feeds["past_key"].copy(), feeds["past_value"].copy()
        k[:, :, past:past + len(path) - 1] = key[:, :, [past + i for i in path[:-1]]]
        v[:, :, past:past + len(path) - 1] = value[:, :, [past + i for i in path[:-1]]]
        at = past + len(path) - 1
        one = dict(feeds, qkv=feeds["qkv"][:, r:r + 1].copy(), past_key=k, past_value=v,
                   seqlens_k=np.array([at], np.int32), total=np.array(at + 1, np.int32),
                   position_ids=np.array([[at]], np.int64), bias=np.zeros((1, 1, 1, at + 1), np.float32))
        plain, plain_key, plain_value = _bound(session, one)
        np.testing.assert_array_equal(out[0, r], plain[0, 0])
        np.testing.assert_array_equal(key[:, :, past + r], plain_key[:, :, at])
        np.testing.assert_array_equal(value[:, :, past + r], plain_value[:, :, at])


@pytest.fixture(scope="module")
def chain_runtime(tiny_dirs, tmp_path_factory):
    """A kernel artifact of a chain tree: a Medusa graph of one path."""
    root = tmp_path_factory.mktemp("chain")
    (root / "chain.json").write_text("[[0], [0, 0]]")
    return engine_tests.build_runtimes(tiny_dirs, root, dtypes=("fp32",), attention="kernel",
                                       tree=str(root / "chain.json"))["fp32"]


def test_a_one_path_kernel_graph_verifies_one_path_per_step(chain_runtime, monkeypatch):
    """Drafts may not branch off the heads' chain on a one-path kernel graph: a masked branch is exact only while
    every node's key stays in its 256-key chunk, and branching steps were measured not to pay (docs/graphs.md,
    exact tree verification). Every plan of a decoding with drafts has one path; some plans hold drafts."""
    from medusa_export.runtime import decode as decode_module
    from medusa_export.runtime.decode import GenerationConfig

    plan, plans = decode_module.plan, []

    def recording(*args, **kwargs):
        plans.append(plan(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(decode_module, "plan", recording)
    for prompt in TINY_PROMPTS:
        chain_runtime.generator.generate(list(prompt) * 4, GenerationConfig(max_new_tokens=30, ignore_eos=True))
    assert chain_runtime.generator.backend.max_paths == 1
    assert all(p.num_paths == 1 for p in plans) and any(p.drafted for p in plans)
