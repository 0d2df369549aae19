"""Hardware-aware Medusa tree search: the tree that maximises predicted tokens per second.

    acc = np.array([[0.6, 0.1, 0.05], [0.4, 0.1, 0.05]])       # acc[d][r]: head d, rank r is right
    latency = LatencyModel({1: 0.010, 16: 0.011, 64: 0.030})     # seconds per step of T tree nodes
    result = search_tree(acc, latency, node_budget=63)
    result.choices, result.expected_accepted, result.tokens_per_s, result.curve

Model (Medusa paper, section 3.3.1): head d's rank-r candidate is correct with probability
``acc[d][r]`` given that the path up to it was correct, independently across depths. A node's
value is the product of ``acc`` along its path, and the expected number of accepted candidates of
a tree is the sum of its nodes' values. A step yields that plus the base model's own token, and
costs ``latency(n + 1)`` seconds for a tree of ``n`` paths (``+ 1``: the root).

Search: values never grow along a path (``acc <= 1``), so adding nodes in decreasing order of value
(best-first from the root) keeps every prefix in the tree and, for every size ``n``, gives a tree
whose value is the sum of the ``n`` largest node values: the best tree of that size. Every size up
to the budget is scored and the one with the most tokens per second wins (the smallest on ties).
numpy only: no torch.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from .errors import InputError
from .tree import MAX_TREE_NODES, Tree

Path_ = tuple[int, ...]
LatencyFn = Callable[[int], float]


class LatencyModel:
    """Seconds per step as a function of T (tree nodes including the root), from measurements.

    Piecewise-linear between measured sizes, flat below the smallest, and extended with the last
    segment's slope above the largest. ``monotone`` (default) replaces each measurement by the
    running maximum, since a bigger step is never really faster and timing noise should not make
    one look so.
    """

    def __init__(self, table: Mapping[int, float], monotone: bool = True) -> None:
        if not table:
            raise InputError("latency table is empty: measure at least one step size")
        sizes = np.array(sorted(int(k) for k in table), np.float64)
        secs = np.array([float(table[k]) for k in sorted(table, key=int)], np.float64)
        if sizes[0] < 1 or not np.all(np.isfinite(secs)) or np.any(secs <= 0):
            raise InputError(f"latency table {dict(table)} needs sizes >= 1 and positive finite seconds")
        self.sizes = sizes
        self.seconds = np.maximum.accumulate(secs) if monotone else secs

    def __call__(self, nodes: int) -> float:
        x, y = self.sizes, self.seconds
        if nodes > x[-1] and len(x) > 1:
            slope = max((y[-1] - y[-2]) / (x[-1] - x[-2]), 0.0)
            return float(y[-1] + slope * (nodes - x[-1]))
        return float(np.interp(nodes, x, y))


@dataclass(frozen=True)
class SizePoint:
    """One tree size on the curve: ``nodes`` paths (``nodes + 1`` rows per step with the root)."""

    nodes: int
    expected_accepted: float
    latency_s: float
    tokens_per_s: float

    def to_json(self) -> dict:
        return {"nodes": self.nodes, "expected_accepted": self.expected_accepted,
                "latency_s": self.latency_s, "tokens_per_s": self.tokens_per_s}


@dataclass(frozen=True)
class TreeSearchResult:
    choices: tuple[Path_, ...]  # the chosen tree, sorted by (depth, path)
    expected_accepted: float  # expected accepted candidates per step (excluding the base token)
    latency_s: float  # predicted seconds per step
    tokens_per_s: float  # predicted (1 + expected_accepted) / latency_s
    curve: tuple[SizePoint, ...]  # every size 1..budget
    order: tuple[Path_, ...]  # best-first order: the best tree of size n is order[:n]
    baseline_tokens_per_s: float  # one token per step of T=1 (no candidates)

    @property
    def candidates(self) -> int:
        """The tree's nodes besides the root (what ``node_budget`` bounds)."""
        return len(self.choices)

    @property
    def max_depth(self) -> int:
        return max(len(p) for p in self.choices)

    def to_json(self) -> dict:
        return {
            "medusa_choices": [list(p) for p in self.choices],
            "num_nodes": self.candidates + 1,  # with the root, as the manifest and bench count a tree
            "candidates": self.candidates,
            "expected_accepted": self.expected_accepted,
            "latency_s": self.latency_s,
            "tokens_per_s": self.tokens_per_s,
            "baseline_tokens_per_s": self.baseline_tokens_per_s,
            "curve": [p.to_json() for p in self.curve],
        }


def check_accuracy(acc: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """``acc`` as a float64 ``[K, R]`` array, every entry a probability."""
    a = np.asarray(acc, np.float64)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise InputError(f"head accuracy must be a [heads, ranks] table, got shape {a.shape}")
    if not np.all(np.isfinite(a)) or a.min() < 0 or a.max() > 1:
        raise InputError("head accuracy entries must be probabilities in [0, 1]")
    return a


def path_value(path: Sequence[int], acc: np.ndarray) -> float:
    """Probability that every candidate on ``path`` is correct: ``prod_d acc[d][path[d]]``."""
    return float(np.prod([acc[d, r] for d, r in enumerate(path)]))


def expected_accepted(choices: Sequence[Sequence[int]], acc: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Expected accepted candidates per step of a tree (the base model's own token not counted)."""
    a = check_accuracy(acc)
    return float(sum(path_value(p, a) for p in choices))


def best_first_order(acc: Sequence[Sequence[float]] | np.ndarray, max_nodes: int,
                     max_depth: int | None = None, max_paths: int | None = None) -> list[tuple[Path_, float]]:
    """Up to ``max_nodes`` paths with their values, in decreasing value; every prefix comes first.

    ``max_paths``: every prefix of the order is a tree of at most that many root-to-leaf paths (a node that
    would branch off a non-leaf once the trees have that many is passed over). Ties go to the shallower,
    then the lexicographically smaller path, so the order is deterministic.
    """
    a = check_accuracy(acc)
    if max_depth is not None and max_depth < 1:  # 0 still gave the first head's nodes
        raise InputError(f"max_depth must be at least 1 (a tree of the first head alone), got {max_depth}")
    if max_paths is not None and max_paths < 1:  # 0 still gave a chain of one path
        raise InputError(f"max_paths must be at least 1 (a chain), got {max_paths}")
    depth_cap = a.shape[0] if max_depth is None else min(max_depth, a.shape[0])
    ranks = a.shape[1]
    heap: list[tuple[float, int, Path_]] = [(-a[0, r], 1, (r,)) for r in range(ranks)]
    heapq.heapify(heap)
    order: list[tuple[Path_, float]] = []
    leaves: set[Path_] = {()}
    while heap and len(order) < max_nodes:
        neg, d, path = heapq.heappop(heap)
        branches = path[:-1] not in leaves  # its parent has a child already: one more path
        if branches and max_paths is not None and len(leaves) >= max_paths:
            continue  # its parent never becomes a leaf again: passed over for good
        leaves = (leaves - {path[:-1]}) | {path}
        order.append((path, -neg))
        if d < depth_cap:
            for r in range(ranks):
                heapq.heappush(heap, (neg * a[d, r], d + 1, path + (r,)))
    return order


def search_tree(acc: Sequence[Sequence[float]] | np.ndarray, latency: LatencyFn | Mapping[int, float],
                node_budget: int, max_depth: int | None = None, min_nodes: int = 1,
                max_paths: int | None = None) -> TreeSearchResult:
    """The tree of ``min_nodes..node_budget`` paths with the most predicted tokens per second.

    ``acc`` is ``[heads, ranks]``; ``latency`` maps T (nodes including the root) to seconds, either
    a callable or a measured table (see `LatencyModel`). ``node_budget`` counts paths, not the root.
    ``max_paths``: at most that many root-to-leaf paths (a fused graph verifies a fixed number exactly).
    """
    a = check_accuracy(acc)
    if node_budget < 1 or min_nodes < 1 or min_nodes > node_budget:
        raise InputError(f"node budget must be >= 1 (and >= min_nodes={min_nodes}), got {node_budget}")
    if node_budget > MAX_TREE_NODES:  # a chosen tree past it failed in `Tree` ("the tree given"), after the search
        raise InputError(f"node budget {node_budget} is past the largest tree the runtime takes ({MAX_TREE_NODES} "
                         f"nodes): use {MAX_TREE_NODES} or less")
    lat = latency if callable(latency) else LatencyModel(latency)
    order = best_first_order(a, node_budget, max_depth, max_paths)
    if len(order) < min_nodes:
        raise InputError(f"only {len(order)} tree nodes exist with these heads, fewer than min_nodes={min_nodes}")
    cum = np.cumsum([v for _, v in order])
    curve = []
    for n in range(1, len(order) + 1):
        secs = float(lat(n + 1))
        if not np.isfinite(secs) or secs <= 0:
            raise InputError(f"latency({n + 1}) = {secs}: latency must be positive seconds")
        e = float(cum[n - 1])
        curve.append(SizePoint(n, e, secs, (1.0 + e) / secs))
    eligible = curve[min_nodes - 1:]
    best = max(eligible, key=lambda p: (p.tokens_per_s, -p.nodes))
    paths = [p for p, _ in order[: best.nodes]]
    tree = Tree.from_choices(paths, topk=a.shape[1], num_heads=a.shape[0])  # validates
    base = float(lat(1))
    return TreeSearchResult(tree.choices, best.expected_accepted, best.latency_s, best.tokens_per_s,
                            tuple(curve), tuple(p for p, _ in order), 1.0 / base)
