"""Tree buffers against hand-computed ones, the mask as an ancestor relation, validation and presets."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medusa_export.runtime.errors import TreeError
from medusa_export.runtime.tree import (CPU_SMALL_10, MAX_TREE_FILE_BYTES, MC_SIM_7B_63, Tree, chain, load_choices,
                                        preset_names)


def rows(a: np.ndarray) -> set[tuple[int, ...]]:
    """paths_nodes rows as a set: the order of leaves carries no meaning."""
    return {tuple(int(x) for x in r) for r in a}


def mask_from(sets: list[set[int]]) -> np.ndarray:
    m = np.zeros((len(sets), len(sets)), bool)
    for i, s in enumerate(sets):
        m[i, sorted(s)] = True
    return m


# ---------------------------------------------------------------------------------------------- buffers


def test_docstring_tree_by_hand():
    t = Tree.from_choices([(0,), (1,), (0, 0)], topk=10)
    assert t.choices == ((0,), (1,), (0, 0))
    assert t.source_index.tolist() == [0, 1, 2, 11]
    assert t.depth.tolist() == [0, 1, 1, 2]
    assert t.parent.tolist() == [-1, 0, 0, 1]
    np.testing.assert_array_equal(t.mask, mask_from([{0}, {0, 1}, {0, 2}, {0, 1, 3}]))
    assert rows(t.paths_nodes) == {(0, 1, 3), (0, 2, -1)}
    assert t.num_nodes == 4 and t.max_depth == 2
    assert t.mask.dtype == bool and t.source_index.dtype == np.int64


def test_chain_by_hand():
    t = Tree.from_choices(load_choices("chain-3"), topk=4, num_heads=3)
    assert t.choices == ((0,), (0, 0), (0, 0, 0))
    assert t.source_index.tolist() == [0, 1, 5, 9]  # 1 + (depth-1)*topk + rank
    assert t.depth.tolist() == [0, 1, 2, 3]
    assert t.parent.tolist() == [-1, 0, 1, 2]
    np.testing.assert_array_equal(t.mask, np.tri(4, dtype=bool))
    assert t.paths_nodes.tolist() == [[0, 1, 2, 3]]


def test_unsorted_branchy_tree_by_hand():
    # Given out of order; sorted by (depth, path): (0,) (2,) (0,1) (2,0) (0,1,3) -> nodes 1..5.
    t = Tree.from_choices([(2,), (0, 1, 3), (0,), (2, 0), (0, 1)], topk=5, num_heads=3)
    assert t.choices == ((0,), (2,), (0, 1), (2, 0), (0, 1, 3))
    assert t.source_index.tolist() == [0, 1, 3, 7, 6, 14]
    assert t.depth.tolist() == [0, 1, 1, 2, 2, 3]
    assert t.parent.tolist() == [-1, 0, 0, 1, 2, 3]
    np.testing.assert_array_equal(t.mask, mask_from([{0}, {0, 1}, {0, 2}, {0, 1, 3}, {0, 2, 4}, {0, 1, 3, 5}]))
    assert rows(t.paths_nodes) == {(0, 2, 4, -1), (0, 1, 3, 5)}
    assert t.to_json() == [[0], [2], [0, 1], [2, 0], [0, 1, 3]]


def test_tree_equality_ignores_input_order():
    a = Tree.from_choices([(1,), (0,), (0, 0)], topk=3)
    b = Tree.from_choices([(0, 0), (0,), (1,)], topk=3)
    assert a.choices == b.choices
    for name in ("source_index", "depth", "parent", "mask", "paths_nodes"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


# ---------------------------------------------------------------------------------------------- property

@st.composite
def trees(draw, max_heads: int = 4, max_topk: int = 10, max_paths: int = 16):
    """Valid trees: random paths (depth <= heads, ranks < topk) closed under prefixes."""
    heads = draw(st.integers(1, max_heads))
    topk = draw(st.integers(1, max_topk))
    raw = draw(st.lists(st.lists(st.integers(0, topk - 1), min_size=1, max_size=heads), min_size=1, max_size=max_paths))
    closed = {tuple(p[:d]) for p in raw for d in range(1, len(p) + 1)}
    paths = draw(st.permutations(sorted(closed)))
    return list(paths), topk, heads


@given(trees())
@settings(max_examples=150, deadline=None)
def test_mask_is_exactly_ancestor_or_self(spec):
    paths, topk, heads = spec
    t = Tree.from_choices(paths, topk=topk, num_heads=heads)
    nodes = [()] + list(t.choices)  # node i's path; the root is ()
    n = len(nodes)
    assert t.num_nodes == n == len(set(paths)) + 1
    for i, pi in enumerate(nodes):
        for j, pj in enumerate(nodes):
            ancestor = pi[: len(pj)] == pj  # j is i or an ancestor of i
            assert t.mask[i, j] == ancestor, (pi, pj)
            if not ancestor and not (pj[: len(pi)] == pi):
                assert not t.mask[i, j] and not t.mask[j, i]  # sibling branches never see each other
    # Every other buffer agrees with the paths.
    for i, p in enumerate(nodes[1:], start=1):
        assert t.depth[i] == len(p)
        assert t.source_index[i] == 1 + (len(p) - 1) * topk + p[-1]
        assert nodes[t.parent[i]] == p[:-1]
    assert t.parent[0] == -1 and t.depth[0] == 0 and t.source_index[0] == 0
    # Row i of the mask = the set reached by walking parents.
    for i in range(n):
        walk, node = set(), i
        while node >= 0:
            walk.add(node)
            node = int(t.parent[node])
        assert set(np.flatnonzero(t.mask[i]).tolist()) == walk
    # paths_nodes: one root-to-leaf chain per leaf, each a chain in the mask, covering every node.
    leaves = {i for i, p in enumerate(nodes) if not any(q[: len(p)] == p and q != p for q in nodes)}
    assert t.paths_nodes.shape == (len(leaves), t.max_depth + 1)
    seen_leaves, covered = set(), set()
    for r in t.paths_nodes:
        real = [int(x) for x in r if x >= 0]
        assert (r[len(real):] == -1).all() and real[0] == 0
        for a, b in zip(real, real[1:]):
            assert t.parent[b] == a
        seen_leaves.add(real[-1])
        covered.update(real)
    assert seen_leaves == leaves and covered == set(range(n))


# ---------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize(
    "paths, kwargs, needle",
    [
        ([(0,), (1, 2)], {}, "[1, 2]"),  # missing prefix (1,)
        ([(0,), (0, 0, 1), (0, 0)], {"num_heads": 2}, "[0, 0, 1]"),  # depth > heads
        ([(0,), (0,)], {}, "[0]"),  # duplicate
        ([(0,), (0, 1), (0, 1)], {}, "[0, 1]"),  # duplicate, deeper
        ([(0,), (10,)], {}, "[10]"),  # rank == topk
        ([(0,), (0, 12)], {}, "[0, 12]"),  # rank > topk
        ([(-1,)], {}, "[-1]"),  # negative rank
        ([(0,), (0, -3)], {}, "[0, -3]"),  # negative rank, deeper
        ([(0,), ()], {}, "empty path"),
    ],
)
def test_validation_errors_name_the_path(paths, kwargs, needle):
    with pytest.raises(TreeError) as e:
        Tree.from_choices(paths, topk=10, **kwargs)
    assert needle in str(e.value)
    assert isinstance(e.value, ValueError)
    assert "\n" not in str(e.value)


def test_missing_prefix_message_names_parent_too():
    with pytest.raises(TreeError, match=r"\[3, 0, 1\].*\[3, 0\]"):
        Tree.from_choices([(3,), (3, 0, 1)], topk=10)


def test_rank_limit_follows_topk():
    Tree.from_choices([(0,), (4,)], topk=5)
    with pytest.raises(TreeError, match=r"\[5\].*top-k is 5"):
        Tree.from_choices([(0,), (5,)], topk=5)


def test_depth_equal_to_heads_is_fine():
    assert Tree.from_choices(chain(3), topk=1, num_heads=3).max_depth == 3
    with pytest.raises(TreeError, match=r"\[0, 0, 0\].*2 Medusa heads"):
        Tree.from_choices(chain(3), topk=1, num_heads=2)


def test_unknown_preset_names_it():
    with pytest.raises(TreeError) as e:
        load_choices("no_such_tree")
    assert "no_such_tree" in str(e.value) and "mc_sim_7b_63" in str(e.value)


@pytest.mark.parametrize("name", ["chain-x", "chain-0", "chain--2", "chain-", "chain-65", "chain-200000",
                                  "chain- 2", "chain-+2", "chain-\u0663", "chain-1_0"])
def test_bad_chain_preset(name):
    """chain-200000 built 2e10 tuples before any depth check ran (a hang): the bound comes first."""
    with pytest.raises(TreeError, match="chain"):
        load_choices(name)


@pytest.mark.parametrize("content, needle", [
    (b"\x7fELF\x02\x01\x01\x00\xff\xfe", "not a JSON list of paths"),  # a binary file
    (b"[" * 100_000, "not a JSON list of paths"),  # nesting beyond the recursion limit
    (b"[[" + b"1" * 5000 + b"]]", "not a JSON list of paths"),  # an integer beyond int()'s 4,300 digits
    (json.dumps([[i % 10] for i in range(2000)]).encode(), "at most 1024 paths"),
    (json.dumps([[0] * d for d in range(1, 70)]).encode(), "depth 64"),
    (b"[[0], [true]]", "list of paths of integers"),
])
def test_tree_files_that_are_not_trees_are_tree_errors(tmp_path, content, needle):
    f = tmp_path / "tree.json"
    f.write_bytes(content)
    with pytest.raises(TreeError, match=needle) as e:
        load_choices(f)
    assert str(f) in str(e.value)


@pytest.mark.parametrize("given", [np.array(0), [np.array(0)], [[0], np.array(1)], 7, [7], "".join])
def test_a_given_tree_that_is_no_list_of_paths_is_a_tree_error(given):
    """A 0-d array raised TypeError from len() or iteration."""
    with pytest.raises(TreeError, match="the tree given must hold a list of paths of integers"):
        load_choices(given)


def test_arrays_of_paths_are_trees():
    assert load_choices(np.array([[0], [1]])) == ((0,), (1,))
    assert load_choices([np.array([0]), np.array([0, 1])]) == ((0,), (0, 1))


def test_a_directory_as_tree_file_is_a_tree_error(tmp_path):
    with pytest.raises(TreeError, match="cannot read tree file"):
        load_choices(tmp_path)


def test_tree_files_that_are_not_regular_small_files_are_refused_before_reading(tmp_path):
    """--tree /dev/zero read until the machine's memory was gone, and a FIFO waited for a writer forever."""
    fifo = tmp_path / "tree.fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (MAX_TREE_FILE_BYTES + 1))
    for path, why in ((fifo, "not a regular file"), ("/dev/zero", "not a regular file"),
                      (big, f"larger than {MAX_TREE_FILE_BYTES} bytes")):
        with pytest.raises(TreeError, match=why):
            load_choices(str(path))
    with pytest.raises(TreeError, match="does not exist"):
        load_choices(str(tmp_path / "missing.json"))


def test_bad_json_file_names_it(tmp_path):
    f = tmp_path / "tree.json"
    f.write_text("[[0], [0, 0")
    with pytest.raises(TreeError) as e:
        load_choices(str(f))
    assert str(f) in str(e.value) and "JSON" in str(e.value)


@pytest.mark.parametrize("content", ['{"paths": [[0]]}', '[[0], ["a"]]', '[0, 1]', '"chain-2"', '[[0], [1.5]]'])
def test_wrong_json_structure(tmp_path, content):
    f = tmp_path / "tree.json"
    f.write_text(content)
    with pytest.raises(TreeError) as e:
        load_choices(f)
    assert str(f) in str(e.value)


def test_a_tree_file_with_a_byte_order_mark_is_read(tmp_path):
    """Editors on Windows write one; prompt files accept it too."""
    f = tmp_path / "tree.json"
    f.write_bytes(b"\xef\xbb\xbf" + b"[[0], [0, 0]]")
    assert load_choices(f) == ((0,), (0, 0))


def test_json_file_list_and_dict_forms(tmp_path):
    t = Tree.from_choices(CPU_SMALL_10, topk=10, num_heads=4)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(t.to_json()))
    b.write_text(json.dumps({"medusa_choices": t.to_json(), "note": "from calibrate"}))
    assert set(load_choices(a)) == set(load_choices(str(b))) == set(CPU_SMALL_10)
    assert Tree.from_choices(load_choices(a), topk=10, num_heads=4).choices == t.choices


def test_json_file_with_invalid_tree_is_rejected_at_build(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text("[[0], [2, 1]]")
    with pytest.raises(TreeError, match=r"\[2, 1\]"):
        Tree.from_choices(load_choices(f), topk=10)


def test_list_spec_is_normalised():
    assert load_choices([[0], [0, 1]]) == ((0,), (0, 1))
    assert load_choices([(np.int64(1),)]) == ((1,),)


# ---------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("spec", [5, b"x", [[0, "a"]], {"a": 1}, [[1.7]], [[0, True]], [0, 1], [[0] * 100_000]])
def test_a_tree_given_in_code_that_is_not_paths_of_integers_is_a_tree_error(spec):
    """What the library's ``tree=`` takes besides names and files: no float, boolean or string silently read as a
    rank, no untyped error, and a bound on the size before the message quotes anything."""
    with pytest.raises(TreeError) as info:
        load_choices(spec)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("choices", [[[0], [0, 1.5]], [[True]], [["0"]]])
def test_tree_from_choices_refuses_what_is_not_an_integer_too(choices):
    """The constructor the library and tests call directly: no float, boolean or string read as a rank."""
    with pytest.raises(TreeError, match="not an integer"):
        Tree.from_choices(choices, topk=10)


def test_numpy_integers_are_ranks():
    assert load_choices([np.array([0, 1], dtype=np.int64), (np.int32(0),)]) == ((0, 1), (0,))


def test_mc_sim_7b_63():
    choices = load_choices("mc_sim_7b_63")
    assert choices == MC_SIM_7B_63 and len(choices) == 63 and len(set(choices)) == 63
    for heads in (4, 5):
        t = Tree.from_choices(choices, topk=10, num_heads=heads)
        assert t.num_nodes == 64 and t.max_depth == 4
    with pytest.raises(TreeError):
        Tree.from_choices(choices, topk=10, num_heads=3)
    with pytest.raises(TreeError, match="rank 9"):
        Tree.from_choices(choices, topk=9, num_heads=4)


def test_cpu_small_10():
    t = Tree.from_choices(load_choices("cpu_small_10"), topk=3, num_heads=4)
    assert t.num_nodes == 11 and t.max_depth == 4


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_chain_presets(n):
    choices = load_choices(f"chain-{n}")
    assert choices == chain(n) == tuple((0,) * d for d in range(1, n + 1))
    t = Tree.from_choices(choices, topk=1, num_heads=n)
    assert t.paths_nodes.tolist() == [list(range(n + 1))]
    np.testing.assert_array_equal(t.mask, np.tri(n + 1, dtype=bool))


def test_preset_names_all_load():
    """Every preset the help text names loads as a valid tree of the size it is known by."""
    sizes = {"mc_sim_7b_63": 63, "cpu_small_10": 10, "chain-4": 4}
    for name in preset_names():
        name = name.replace("chain-N", "chain-4")
        tree = Tree.from_choices(load_choices(name), topk=10, num_heads=5)
        assert tree.num_nodes - 1 == sizes.pop(name), name
    assert not sizes
    assert load_choices("chain-3") == ((0,), (0, 0), (0, 0, 0))


def test_a_chain_shares_its_read_only_structure_per_length():
    from medusa_export.runtime.step_tree import StepTree

    a, b = StepTree.chain(5, [7, 9]), StepTree.chain(6, [8, 10], kind=2)
    assert a.tokens.tolist() == [5, 7, 9] and b.tokens.tolist() == [6, 8, 10]
    assert a.parent.tolist() == [-1, 0, 1] and a.depth.tolist() == [0, 1, 2] and a.paths_nodes.tolist() == [[0, 1, 2]]
    assert (a.mask == np.tri(3, dtype=bool)).all() and a.source.tolist() == [0, 2, 2]
    assert a.mask is b.mask and not a.mask.flags.writeable  # built once, never written
    merged = StepTree.chain(5, []).with_draft([7, 9], 3)  # a draft merged into a one-node chain copies, not writes
    assert merged.tokens.tolist() == [5, 7, 9] and merged.parent.tolist() == [-1, 0, 1]
