"""Tree search against brute force over every valid tree, and its response to the latency shape."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from medusa_export.runtime.errors import InputError
from medusa_export.runtime.tree import Tree
from medusa_export.runtime.tree_search import (
    LatencyModel,
    best_first_order,
    expected_accepted,
    search_tree,
)


def all_trees(heads: int, ranks: int, max_nodes: int) -> list[tuple[tuple[int, ...], ...]]:
    """Every prefix-closed set of 1..max_nodes paths (the root is implicit)."""
    nodes = [p for d in range(1, heads + 1) for p in itertools.product(range(ranks), repeat=d)]
    trees = []
    for mask in range(1, 1 << len(nodes)):
        subset = [nodes[i] for i in range(len(nodes)) if mask >> i & 1]
        if len(subset) > max_nodes:
            continue
        have = set(subset)
        if all(len(p) == 1 or p[:-1] in have for p in subset):
            trees.append(tuple(subset))
    return trees


def random_acc(rng: np.random.Generator, heads: int, ranks: int, sort: bool) -> np.ndarray:
    acc = rng.uniform(0, 1, (heads, ranks)) * rng.uniform(0.2, 1, (heads, 1))
    return -np.sort(-acc, axis=1) if sort else acc


def linear(per_node: float, fixed: float = 0.0):
    return lambda t: fixed + per_node * t


CASES = [(seed, sort) for seed in range(6) for sort in (True, False)]


@pytest.fixture(scope="module")
def trees_2x3() -> list:
    return all_trees(2, 3, 6)


def test_brute_force_enumeration_size(trees_2x3):
    assert len(all_trees(1, 3, 6)) == 7  # non-empty subsets of 3 roots
    assert all(Tree.from_choices(t, topk=3, num_heads=2) for t in trees_2x3[:50])


@pytest.mark.parametrize("seed,sort", CASES)
def test_best_value_per_size_matches_brute_force(trees_2x3, seed, sort):
    acc = random_acc(np.random.default_rng(seed), 2, 3, sort)
    budget = 6
    res = search_tree(acc, linear(0.01, 0.05), node_budget=budget)
    best = {}
    for t in trees_2x3:
        best[len(t)] = max(best.get(len(t), 0.0), expected_accepted(t, acc))
    assert [p.nodes for p in res.curve] == list(range(1, budget + 1))
    for point in res.curve:
        assert point.expected_accepted == pytest.approx(best[point.nodes], abs=1e-12)
        prefix = res.order[: point.nodes]
        Tree.from_choices(prefix, topk=3, num_heads=2)  # every prefix of the order is a valid tree
        assert expected_accepted(prefix, acc) == pytest.approx(point.expected_accepted, abs=1e-12)


@pytest.mark.parametrize("seed,sort", CASES)
@pytest.mark.parametrize("latency", [linear(0.01, 0.05), linear(0.2, 0.1), lambda t: 1.0 if t <= 4 else 1.0 + (t - 4)])
def test_chosen_tree_maximises_tokens_per_s(trees_2x3, seed, sort, latency):
    acc = random_acc(np.random.default_rng(100 + seed), 2, 3, sort)
    res = search_tree(acc, latency, node_budget=6)
    brute = max((1 + expected_accepted(t, acc)) / latency(len(t) + 1) for t in trees_2x3)
    assert res.tokens_per_s == pytest.approx(brute, rel=1e-12)
    assert res.tokens_per_s == max(p.tokens_per_s for p in res.curve)
    assert (1 + expected_accepted(res.choices, acc)) / latency(res.candidates + 1) == pytest.approx(res.tokens_per_s)
    tree = Tree.from_choices(res.choices, topk=3, num_heads=2)
    assert tree.num_nodes - 1 == res.candidates <= 6


REALISTIC = np.array([
    [0.60, 0.12, 0.06, 0.04],
    [0.45, 0.10, 0.05, 0.03],
    [0.35, 0.08, 0.04, 0.02],
    [0.28, 0.06, 0.03, 0.02],
])


def test_flat_then_steep_latency_picks_bigger_tree_than_linear():
    flat = lambda t: 0.02 if t <= 16 else 0.02 + 0.01 * (t - 16)  # noqa: E731
    lin = linear(0.005)
    big = search_tree(REALISTIC, flat, node_budget=40)
    small = search_tree(REALISTIC, lin, node_budget=40)
    assert big.candidates > small.candidates
    assert big.candidates + 1 <= 17  # past the knee every node costs more than it earns
    assert big.max_depth <= 4 and small.max_depth <= 4
    for r in (big, small):
        Tree.from_choices(r.choices, topk=4, num_heads=4)


def test_order_is_best_first_and_prefix_closed():
    order = best_first_order(REALISTIC, 200)
    values = [v for _, v in order]
    assert values == sorted(values, reverse=True)
    seen = set()
    for p, v in order:
        assert len(p) == 1 or p[:-1] in seen
        seen.add(p)
        assert v == pytest.approx(float(np.prod([REALISTIC[d, r] for d, r in enumerate(p)])))
    assert order[0][0] == (0,) and order[1][0] == (0, 0)


def test_budget_depth_and_small_pools():
    res = search_tree(REALISTIC, linear(0.001, 0.01), node_budget=10, max_depth=2)
    assert res.candidates <= 10 and res.max_depth <= 2
    # Fewer nodes exist than the budget: 1 head x 2 ranks.
    res = search_tree([[0.5, 0.2]], lambda t: 1.0, node_budget=63)
    assert [p.nodes for p in res.curve] == [1, 2] and res.choices == ((0,), (1,))
    # Useless heads: the smallest tree, still valid.
    res = search_tree(np.zeros((3, 4)), linear(0.01, 0.01), node_budget=20)
    assert res.choices == ((0,),) and res.expected_accepted == 0.0


def test_latency_model_interpolates_and_extrapolates():
    m = LatencyModel({"1": 1.0, "4": 2.5, 8: 3.0})
    assert m(1) == 1.0 and m(2) == pytest.approx(1.5) and m(6) == pytest.approx(2.75)
    assert m(16) == pytest.approx(3.0 + 8 * 0.125)
    noisy = LatencyModel({1: 1.0, 2: 0.8, 4: 2.0})
    assert noisy(2) == 1.0  # running max: a bigger step never looks faster
    res = search_tree(REALISTIC, {1: 0.01, 16: 0.011, 64: 0.05}, node_budget=63)
    assert 1 <= res.candidates <= 63
    assert res.to_json()["medusa_choices"] == [list(p) for p in res.choices]


@pytest.mark.parametrize("bad", [[[1.2, 0.1]], [[-0.1]], [0.5, 0.2], [[float("nan")]]])
def test_bad_inputs(bad):
    with pytest.raises(InputError):
        search_tree(bad, lambda t: 1.0, node_budget=4)


def test_bad_budget_and_latency():
    with pytest.raises(InputError):
        search_tree(REALISTIC, lambda t: 1.0, node_budget=0)
    with pytest.raises(InputError):
        search_tree(REALISTIC, lambda t: 0.0, node_budget=3)
    with pytest.raises(InputError):
        LatencyModel({})


@pytest.mark.parametrize("max_paths", [1, 2, 3])
def test_max_paths_bounds_every_tree_on_the_curve(max_paths):
    """A fused graph verifies a fixed number of root-to-leaf paths: every candidate tree respects it, and
    without the bound the same heads would branch more."""
    order = best_first_order(REALISTIC, 40, max_paths=max_paths)
    for n in range(1, len(order) + 1):
        tree = Tree.from_choices([p for p, _ in order[:n]], topk=REALISTIC.shape[1])
        assert len(tree.paths_nodes) <= max_paths
    res = search_tree(REALISTIC, lambda t: 0.01 + 0.0001 * t, node_budget=40, max_paths=max_paths)
    assert len(Tree.from_choices(res.choices, topk=REALISTIC.shape[1]).paths_nodes) <= max_paths
    free = search_tree(REALISTIC, lambda t: 0.01 + 0.0001 * t, node_budget=40)
    assert len(Tree.from_choices(free.choices, topk=REALISTIC.shape[1]).paths_nodes) > max_paths


@pytest.mark.parametrize("option", [{"max_depth": 0}, {"max_depth": -1}, {"max_paths": 0}])
def test_a_bound_that_allows_no_tree_is_refused(option):
    """max_depth 0 still gave the first head's nodes, and max_paths 0 a chain: a tree the bound forbids."""
    with pytest.raises(InputError, match="must be at least 1"):
        best_first_order(REALISTIC, 8, **option)
    with pytest.raises(InputError, match="must be at least 1"):
        search_tree(REALISTIC, lambda t: 0.01, node_budget=8, **option)
    first_head = best_first_order(REALISTIC, 8, max_depth=1)
    assert [p for p, _ in first_head] == [(r,) for r in range(REALISTIC.shape[1])]  # its ranks, best first
