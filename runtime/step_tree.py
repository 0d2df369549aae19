"""One step's candidate tree: the Medusa heads' tree and a chain of context drafts, merged.

    plan = StepTree.heads(tree, candidates(tree, root, heads))       # the calibrated tree alone
    plan = plan.with_draft(draft_tokens)                             # + a chain from the context
    plan = StepTree.chain(root, draft_tokens)                        # drafts alone (no heads)
    out = session.run(plan.tokens, past + plan.depth, plan.mask, ...)
    accept_greedy(plan, plan.tokens, out)                            # walks plan.parent

A draft walks down the heads' tree while its tokens equal a node's (those nodes are shared) and continues as new
nodes from where it leaves it, so no candidate is verified twice. ``source`` says where each node came from, for
acceptance statistics by source.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from .tree import Tree

ROOT, HEADS, CONTEXT = 0, 1, 2


@dataclass(frozen=True)
class StepTree:
    tokens: np.ndarray  # [N] int64, node 0 is the root
    parent: np.ndarray  # [N] int64, root -1; parents come before their children
    depth: np.ndarray  # [N] int64
    mask: np.ndarray  # [N, N] bool, ancestors-or-self
    paths_nodes: np.ndarray  # [L, max_depth + 1] root-to-leaf node indices, -1 padded
    source: np.ndarray  # [N] int8: ROOT, HEADS or CONTEXT
    draft: tuple[int, ...] = ()  # the context draft merged in (some of its tokens may share heads' nodes)
    kind: int = 0  # the draft's acceptance-rate class (`Draft.rate_kind`)

    @property
    def drafted(self) -> int:
        return len(self.draft)

    @property
    def num_nodes(self) -> int:
        return len(self.tokens)

    @property
    def num_paths(self) -> int:
        return len(self.paths_nodes)

    @classmethod
    def heads(cls, tree: Tree, tokens: np.ndarray) -> "StepTree":
        source = np.full(tree.num_nodes, HEADS, np.int8)
        source[0] = ROOT
        return cls(np.asarray(tokens, np.int64), tree.parent, tree.depth, tree.mask, tree.paths_nodes, source)

    @classmethod
    def chain(cls, root: int, draft: list[int], kind: int = 0) -> "StepTree":
        return cls(np.asarray([root, *draft], np.int64), *_chain_shape(1 + len(draft)), tuple(draft), kind)

    def shared(self, draft: list[int]) -> list[int]:
        """The nodes the draft walks down from the root while its tokens equal theirs (those it shares). On lists:
        see `acceptance.accept_greedy`."""
        parent, tokens = self.parent.tolist(), self.tokens.tolist()
        nodes: list[int] = []
        for token in draft:
            at = nodes[-1] if nodes else 0
            match = next((i for i in range(at + 1, len(tokens)) if parent[i] == at and tokens[i] == token), None)
            if match is None:
                break
            nodes.append(match)
        return nodes

    def is_leaf(self, node: int) -> bool:
        return node not in self.parent.tolist()

    def with_draft(self, draft: list[int], kind: int = 0) -> "StepTree":
        """This tree plus ``draft`` (of acceptance-rate class ``kind``) as a chain below the root, sharing the
        nodes it agrees with."""
        walked = self.shared(draft)
        node, k = (walked[-1] if walked else 0), len(walked)
        extra = len(draft) - k
        if extra == 0:
            return replace(self, draft=tuple(draft), kind=kind)
        n = self.num_nodes
        new = np.arange(n, n + extra)
        parent = np.concatenate([self.parent, np.concatenate(([node], new[:-1]))])
        depth = np.concatenate([self.depth, self.depth[node] + 1 + np.arange(extra)])
        mask = np.zeros((n + extra, n + extra), bool)
        mask[:n, :n] = self.mask
        mask[n:, :n] = self.mask[node]
        mask[n:, n:] = np.tri(extra, dtype=bool)
        chain_ = np.concatenate([np.flatnonzero(self.mask[node]), new])  # root .. node, then the new nodes
        paths = [p for p in self.paths_nodes if node not in p or p[self.depth[node]] != node
                 or (p[self.depth[node] + 1:] >= 0).any()]  # a path that ended at ``node`` is extended
        width = max(self.paths_nodes.shape[1], len(chain_))
        rows = [np.pad(p, (0, width - len(p)), constant_values=-1) for p in [*paths, chain_]]
        source = np.concatenate([self.source, np.full(extra, CONTEXT, np.int8)])
        return StepTree(np.concatenate([self.tokens, draft[k:]]).astype(np.int64), parent, depth, mask,
                        np.stack(rows), source, tuple(draft), kind)


@lru_cache(maxsize=64)
def _chain_shape(n: int) -> tuple[np.ndarray, ...]:
    """parent, depth, mask, paths_nodes and source of an ``n``-node chain: built once per length (a decoding step
    makes a chain every step; these arrays are only ever read)."""
    source = np.full(n, CONTEXT, np.int8)
    source[0] = ROOT
    arrays = (np.arange(-1, n - 1), np.arange(n), np.tri(n, dtype=bool), np.arange(n)[None], source)
    for a in arrays:
        a.flags.writeable = False
    return arrays
