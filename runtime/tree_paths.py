"""Exact tree verification: a tree step's attention run per root-to-leaf path.

    batch = PathBatch.from_mask(tree.mask, paths=2)
    batch.path_rows   # [depth + 1, paths] node at each depth of each path (graph input ``path_rows``)
    batch.node_rows   # [nodes] where each node's attention output is read (graph input ``node_rows``)

Why: in a masked tree step a node's visible keys are its ancestors with its siblings' (masked) rows between
them, in a key window that ends at its own row. Attention kernels sum a row's softmax in SIMD lanes and blocks
placed by key index and window length, so the node's numbers differ in the last bits from those of a plain
one-token step at its position. fp32 greedy rarely notices; int8 activation quantization turns those bits into
other roundings, and greedy Medusa drifts from greedy vanilla within a few dozen tokens.

The fused graph of a branching tree (exporter/fused_backbone.py) instead gives each path its own group of
attention heads with its own copy of the KV cache: the step's rows are depths (0..D), and in group b row r is
the node at depth r of path b. Every node then sees exactly the keys a one-token step at its position sees, at
the same indices and in the same window, so its numbers are bit-identical to plain decoding and greedy Medusa
equals greedy vanilla by construction, at every dtype. Only attention repeats per path; the matmuls still run
once per node. A tree with fewer paths than the graph's groups repeats its first path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PathBatch:
    path_rows: np.ndarray  # [D + 1, P] node at depth r of path b; a shorter path repeats its last node
    node_rows: np.ndarray  # [N] flat index r * P + b of the (depth, path) each node is read from
    lengths: np.ndarray  # [P] real rows of each path

    @property
    def paths(self) -> int:
        return int(self.path_rows.shape[1])

    @classmethod
    def from_mask(cls, mask: np.ndarray, paths: int) -> "PathBatch":
        """The paths of a tree mask ([N, N] bool, node i sees j iff j is i or an ancestor; ancestors first),
        longest first (its positions are the rows'), padded to ``paths`` by repeating the first."""
        mask = np.asarray(mask, bool)
        _check_tree_mask(mask)
        n = mask.shape[0]
        is_ancestor = mask & ~np.eye(n, dtype=bool)  # [i, j]: j is an ancestor of i
        leaves = np.flatnonzero(~is_ancestor.any(axis=0))
        found = sorted((np.flatnonzero(mask[leaf]) for leaf in leaves), key=len, reverse=True)
        if len(found) > paths:
            raise ValueError(f"the tree has {len(found)} root-to-leaf paths but the graph verifies at most {paths}")
        found += [found[0]] * (paths - len(found))
        if any(p[0] != found[0][0] for p in found):
            raise ValueError("a tree mask must have one root that every node descends from")
        lengths = np.array([len(p) for p in found], np.int64)
        path_rows = np.stack([np.pad(p, (0, lengths[0] - len(p)), mode="edge") for p in found], axis=1)
        node_rows = np.zeros(n, np.int64)
        for b in range(paths - 1, -1, -1):  # the first path holding a node wins
            node_rows[found[b]] = np.arange(lengths[b]) * paths + b
        return cls(path_rows, node_rows, lengths)

    def path_of(self, nodes: np.ndarray) -> int:
        """The path whose first rows are ``nodes`` (an accepted root-to-node chain); its KV rows are those."""
        nodes = np.asarray(nodes, np.int64)
        k = len(nodes)
        for b in range(self.paths):
            if k <= self.lengths[b] and np.array_equal(self.path_rows[:k, b], nodes):
                return b
        raise ValueError(f"nodes {nodes.tolist()} are not a root-to-node chain of the verified tree")


def _check_tree_mask(mask: np.ndarray) -> None:
    """ValueError unless ``mask`` is an ancestors-or-self mask with ancestors before their descendants."""
    n = mask.shape[0]
    if mask.ndim != 2 or mask.shape != (n, n) or not mask.diagonal().all() or np.triu(mask, 1).any():
        raise ValueError("a tree mask must be [N, N], see itself, and have every ancestor before its descendants")
    for i in range(1, n):
        ancestors = np.flatnonzero(mask[i, :i])
        if len(ancestors) and not np.array_equal(mask[i, :i], mask[ancestors[-1], :i]):
            raise ValueError(f"tree mask row {i} is not its parent's row plus the parent: not a tree")
