"""Per-path tree verification, the parts that need no graph: a tree mask's paths (`PathBatch`) and the KV
slots each path runs on (`SlotCache`). The graph side (bit-identical to plain steps) is in test_fused_graph."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from medusa_export.runtime.backends.base import ModelDims
from medusa_export.runtime.backends.slot_cache import SlotCache, small_page_zeros
from medusa_export.runtime.errors import TreeError
from medusa_export.runtime.generator import Generator
from medusa_export.runtime.tree import Tree
from medusa_export.runtime.tree_paths import PathBatch

from conftest import random_trees

DIMS = ModelDims(num_layers=2, num_kv_heads=2, head_dim=3, vocab_size=10, num_heads=3, head_topk=4, sample_topk=1)


def test_paths_by_hand():
    tree = Tree.from_choices([[0], [1], [0, 0]], topk=4)  # nodes: root, (0,), (1,), (0, 0)
    batch = PathBatch.from_mask(tree.mask, paths=3)
    assert batch.path_rows.tolist() == [[0, 0, 0], [1, 2, 1], [3, 2, 3]]  # longest first; padded by repeats
    assert batch.lengths.tolist() == [3, 2, 3]
    assert batch.node_rows.tolist() == [0, 3, 4, 6]  # depth * paths + path
    assert batch.path_of(np.array([0, 2])) == 1 and batch.path_of(np.array([0, 1, 3])) == 0
    with pytest.raises(ValueError, match="not a root-to-node chain"):
        batch.path_of(np.array([0, 3]))


def test_a_causal_mask_is_one_path():
    batch = PathBatch.from_mask(np.tri(5, dtype=bool), paths=2)
    assert batch.path_rows[:, 0].tolist() == list(range(5)) and batch.node_rows.tolist() == [0, 2, 4, 6, 8]


@settings(max_examples=60, deadline=None)
@given(choices=random_trees(4, topk=4, max_nodes=12))
def test_every_node_is_read_from_a_path_that_holds_it(choices):
    tree = Tree.from_choices(choices, topk=4)
    p = len(tree.paths_nodes)
    batch = PathBatch.from_mask(tree.mask, paths=p + 1)
    depth, path = np.divmod(batch.node_rows, batch.paths)
    assert (batch.path_rows[depth, path] == np.arange(tree.num_nodes)).all()
    assert (depth == tree.depth).all()
    for b in range(batch.paths):  # each path is a root-to-leaf chain
        rows = batch.path_rows[: batch.lengths[b], b]
        assert all(tree.parent[c] == a for a, c in zip(rows, rows[1:]))


def test_bad_masks_and_too_many_paths_are_refused():
    tree = Tree.from_choices([[0], [1], [2]], topk=4)
    with pytest.raises(ValueError, match="3 root-to-leaf paths but the graph verifies at most 2"):
        PathBatch.from_mask(tree.mask, paths=2)
    with pytest.raises(ValueError, match="ancestor before"):
        PathBatch.from_mask(np.ones((3, 3), bool), paths=4)
    with pytest.raises(ValueError, match="not a tree"):  # node 2 sees node 1 but not node 1's parent
        PathBatch.from_mask(np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1]], bool), paths=4)


def test_generator_refuses_a_tree_with_more_paths_than_the_graph(make_tokenizer):
    class Fixed:  # the one attribute Generator reads before decoding
        dims, max_paths = DIMS, 2

    with pytest.raises(TreeError, match="3 root-to-leaf paths .* at most 2"):
        Generator(Fixed(), make_tokenizer(), Tree.from_choices([[0], [1], [2]], topk=4))


def _write(views: list[np.ndarray], slots: int, start: int, t: int, tag: int) -> None:
    """Rows [start, start + t) of each slot: tag * 1000 + slot * 100 + row."""
    for v in views:
        groups = v.reshape(slots, DIMS.num_kv_heads, *v.shape[2:])
        for s in range(slots):
            groups[s, :, start:start + t] = (tag * 1000 + s * 100 + np.arange(t))[None, :, None]


def test_slot_cache_commits_a_path_and_syncs_the_others_lazily():
    kv = SlotCache(DIMS, capacity=16)
    _write(kv.stage(4), 1, 0, 4, tag=1)
    kv.keep(np.arange(4))  # prefill on slot 0
    views = kv.stage(3, slots=3)  # slots 1, 2 get the prefix now
    assert kv.slots == 3 and all((kv.store[:, s, :, :4] == kv.store[:, 0, :, :4]).all() for s in (1, 2))
    _write(views, 3, 4, 3, tag=2)
    kv.keep(np.arange(2), slot=2)  # the accepted path ran on slot 2: its first two rows
    assert kv.length == 6
    assert kv.store[0, 0, 0, 4:6, 0].tolist() == [2200, 2201]
    assert kv.synced == [0, 4, 6]  # slot 1 holds another path's rows from 4 on; slot 2 holds the commit
    kv.stage(3, slots=3)
    assert all((kv.store[:, s, :, :6] == kv.store[:, 0, :, :6]).all() for s in (1, 2))
    with pytest.raises(ValueError, match="increasing rows"):
        kv.keep(np.array([1, 0]), slot=1)
    with pytest.raises(ValueError, match="slot below 3"):
        kv.keep(np.arange(1), slot=3)


def test_slot_cache_one_row_commit_after_a_path_step():
    """A plain step's `keep([0])` (committed without moving a row) after a path step: the row the run wrote in slot 0
    is kept, the other slots are marked stale from it, and nothing is staged any more."""
    kv = SlotCache(DIMS, capacity=16)
    _write(kv.stage(4), 1, 0, 4, tag=1)
    kv.keep(np.arange(4))
    _write(kv.stage(2, slots=3), 3, 4, 2, tag=2)
    kv.keep(np.arange(1), slot=2)  # the accepted path's first row, from slot 2
    _write(kv.stage(1, slots=3), 3, 5, 1, tag=3)  # a one-row step on three slots
    kv.keep(np.zeros(1, np.int64))
    assert (kv.length, kv.staged, kv.synced) == (6, 0, [0, 5, 5])
    assert kv.store[0, 0, 0, 4:6, 0].tolist() == [2200, 3000]
    kv.stage(1, slots=3)  # the stale row 5 of slots 1 and 2 is brought up to date
    assert all((kv.store[:, s, :, :6] == kv.store[:, 0, :, :6]).all() for s in (1, 2))
    with pytest.raises(ValueError, match="increasing rows"):
        kv.keep(np.array([1]))  # one row, but not the first: the general path's check


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_kv_stores_are_zeroed_private_mappings(dtype):
    """A store is its own private anonymous mapping (kept off transparent huge pages where the OS has them), zeroed,
    writable, and independent of every other store; a growing SlotCache copies its rows into a new one."""
    a, b = small_page_zeros((2, 3, 4097), dtype), small_page_zeros((2, 3, 4097), dtype)
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux: private ("p"), not shared ("s") as mmap's default would be (forks would share it)
        address = a.ctypes.data
        spans = [line.split() for line in maps.read_text().splitlines()]
        perms = [f[1] for f in spans if int(f[0].split("-")[0], 16) <= address < int(f[0].split("-")[1], 16)]
        assert perms and perms[0].endswith("p"), perms
    assert a.dtype == dtype and a.shape == (2, 3, 4097) and a.flags.writeable and not a.any()
    a[1, 2, 4096] = 7
    assert b.sum() == 0 and a.sum() == 7  # no shared memory
    assert isinstance(_memory_of(a), mmap.mmap)
    assert small_page_zeros((0, 3), dtype).shape == (0, 3)
    kv = SlotCache(DIMS, capacity=16)
    assert isinstance(_memory_of(kv.store), mmap.mmap)
    _write(kv.stage(4), 1, 0, 4, tag=1)
    kv.keep(np.arange(4))
    before = kv.store[:, 0, :, :4].copy()
    kv.stage(1, slots=2)  # grows into a new store
    assert (kv.store[:, 0, :, :4] == before).all() and (kv.store[:, 1, :, :4] == before).all()


def _memory_of(array: np.ndarray):
    """What owns an array's memory (past views and buffer wrappers)."""
    owner = array
    while isinstance(owner, (np.ndarray, memoryview)):
        owner = owner.obj if isinstance(owner, memoryview) else owner.base
    return owner
