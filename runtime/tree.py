"""Medusa candidate trees: parse `medusa_choices` into the buffers decoding needs.

A tree is a list of paths; ``(0, 2)`` is rank 0 of head 0 followed by rank 2 of head 1.
Node 0 is the root (the base model's own next token); node ``i >= 1`` is ``paths[i-1]``
after sorting by (depth, path). Candidate tokens come from one flat pool::

    pool = [base_top1, head0_top0 .. head0_top{k-1}, head1_top0 .. ]   # 1 + K*k entries

    tree = Tree.from_choices([(0,), (1,), (0, 0)], topk=10)
    tree.source_index   # [0, 1, 2, 11]     index of each node's token in the pool
    tree.depth          # [0, 1, 1, 2]      position offset of each node
    tree.mask           # [4, 4] bool: node i attends to node j iff j is i or an ancestor
    tree.paths_nodes    # [[0, 2, -1], [0, 1, 3]]  root-to-leaf node indices (leaves in node order), -1 padded
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .bounded_read import read_bounded
from .errors import TreeError

Path_ = tuple[int, ...]

# The reference implementation's sparse 63-node tree (Medusa `mc_sim_7b_63`), tuned for Vicuna-7B on A100.
MC_SIM_7B_63: tuple[Path_, ...] = (
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4), (2, 0),
    (0, 5), (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8), (0, 0, 2), (3, 0),
    (0, 9), (8,), (9,), (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0), (2, 1), (0, 0, 4), (0, 0, 5),
    (0, 0, 0, 0), (0, 1, 1), (0, 0, 6), (0, 3, 0), (5, 0), (1, 3), (0, 0, 7), (0, 0, 8), (0, 0, 9),
    (6, 0), (0, 4, 0), (1, 4), (7, 0), (0, 1, 2), (2, 0, 0), (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5),
    (1, 0, 1), (0, 2, 1), (9, 0), (0, 6, 0), (0, 0, 0, 1), (1, 6), (0, 7, 0),
)

# A small tree for CPUs, where step latency grows quickly past ~16 nodes: a 4-deep main chain
# plus the runner-up of the first two heads. `calibrate-tree` finds a better one for given heads.
CPU_SMALL_10: tuple[Path_, ...] = (
    (0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 0, 0, 0), (2,),
)


# Far beyond any tree worth verifying (the reference's largest is 63 nodes, 4 deep), small enough that building a
# tree's [N, N] buffers and its chain preset stays instant: a bound checked before anything is built.
MAX_TREE_NODES = 1024
MAX_TREE_DEPTH = 64
MAX_TREE_FILE_BYTES = 1 << 20  # 1,024 paths of 64 ranks take well under this


def chain(n: int) -> tuple[Path_, ...]:
    """A single chain of the heads' top-1 guesses, ``n`` nodes deep."""
    return tuple((0,) * d for d in range(1, n + 1))


def preset_names() -> list[str]:
    return ["mc_sim_7b_63", "cpu_small_10", "chain-N"]


def load_choices(spec: str | Path | Sequence[Sequence[int]]) -> tuple[Path_, ...]:
    """Resolve a preset name, a JSON file (a list of paths, or {"medusa_choices": [...]}), or a list."""
    if not isinstance(spec, (str, Path)):
        if isinstance(spec, dict):  # as a tree file may hold it (and as the error below suggests)
            spec = spec.get("medusa_choices")
        return _checked_paths(spec, "the tree given")
    name = str(spec)
    if name == "mc_sim_7b_63":
        return MC_SIM_7B_63
    if name == "cpu_small_10":
        return CPU_SMALL_10
    path = Path(name)
    # chain-big.json (in the current directory) names a tree file, not a bad preset: no chain-N ends in .json
    if name.startswith("chain-") and path.suffix != ".json":
        digits = name.split("-", 1)[1]
        if not (digits.isascii() and digits.isdigit()):  # int() also reads " 2", "+2", "٣" and "1_0"
            raise TreeError(f"bad chain preset {name!r}: use chain-N with N a positive integer, e.g. chain-4")
        n = int(digits)
        if not 1 <= n <= MAX_TREE_DEPTH:
            raise TreeError(f"bad chain preset {name!r}: N must be in 1..{MAX_TREE_DEPTH} (and at most the heads)")
        return chain(n)
    if not path.exists() and not path.is_symlink():
        if path.suffix == ".json" or "/" in name:
            raise TreeError(f"tree file {name!r:.200} does not exist: give a tree JSON file or a preset "
                            f"({', '.join(preset_names())})")
        raise TreeError(f"unknown tree {name!r:.200}: give a preset ({', '.join(preset_names())}) or a JSON file path")
    data = _read_tree_file(path)
    if isinstance(data, dict):
        data = data.get("medusa_choices")
    return _checked_paths(data, f"tree file {path}")


def given_choices(spec: str | Path | Sequence[Sequence[int]]) -> tuple[Path_, ...]:
    """A tree a user gave (``--tree``, ``tree=``), as `load_choices` reads it, with at least one path: a tree of the
    root alone ran "Medusa" without a single guess of the heads, and reports called that Medusa's speed-up. (An
    artifact built without heads records such a tree itself; that one is not given.)"""
    choices = load_choices(spec)
    if not choices:
        shown = spec if isinstance(spec, (str, Path)) else "given"
        raise TreeError(f"the tree {shown!s:.200} has no paths: give at least one (e.g. chain-1 or [[0]]), or decode "
                        f"without speculation (--no-medusa)")
    return choices


def fitted_default(spec: str | Path | Sequence[Sequence[int]], default: str, num_heads: int) -> tuple[Path_, ...]:
    """`given_choices` of ``spec``; where it is the built-in ``default`` (no tree given, none shipped with the
    heads), its paths that ``num_heads`` heads can follow: heads of fewer than its depth were refused for a tree the
    user never chose."""
    choices = given_choices(spec)
    if isinstance(spec, str) and spec == default:
        fitted = tuple(p for p in choices if len(p) <= num_heads)
        return fitted or choices  # no heads at all: the tree's own error says so
    return choices


def _checked_paths(data: object, where: str) -> tuple[Path_, ...]:
    """``data`` as paths: a list (or tuple) of lists of integers (not booleans, not floats), within the size
    bounds; a TreeError naming ``where`` otherwise (the path values themselves are checked by `Tree`)."""
    def sequence(x) -> bool:  # a 0-d array is a number, not a sequence: len() and iteration fail on it
        return isinstance(x, (list, tuple)) or isinstance(x, np.ndarray) and x.ndim >= 1

    if not sequence(data) or not all(sequence(p) for p in data):
        raise TreeError(f"{where} must hold a list of paths of integers (or {{'medusa_choices': [...]}})")
    if len(data) > MAX_TREE_NODES or any(len(p) > MAX_TREE_DEPTH for p in data):
        raise TreeError(f"{where} has {len(data)} paths up to {max(map(len, data), default=0)} deep: at most "
                        f"{MAX_TREE_NODES} paths of depth {MAX_TREE_DEPTH} are accepted; give a smaller tree")
    if not all(isinstance(r, numbers.Integral) and not isinstance(r, bool) for p in data for r in p):
        raise TreeError(f"{where} must hold a list of paths of integers: found a value that is not an integer")
    return tuple(tuple(int(r) for r in p) for p in data)


def _read_tree_file(path: Path):
    """The JSON in ``path``, or a TreeError naming what is wrong with the file."""
    try:
        return json.loads(read_bounded(path, MAX_TREE_FILE_BYTES).decode("utf-8-sig"))  # a byte order mark, as prompt files
    except json.JSONDecodeError as e:
        raise TreeError(f"tree file {path} is not valid JSON ({e.msg} at line {e.lineno}): fix or regenerate it") from None
    except (UnicodeDecodeError, ValueError, RecursionError):  # binary, integers beyond 4,300 digits, deep nesting
        raise TreeError(f"tree file {path} is not a JSON list of paths: give a tree JSON file or a preset") from None
    except OSError as e:  # a directory, a FIFO or device, too large, unreadable
        raise TreeError(f"cannot read tree file {str(path)!r:.200} ({e.strerror or e}): give a tree JSON file or a "
                        f"preset") from None


@dataclass(frozen=True)
class Tree:
    """Everything decoding needs about one tree, as small numpy arrays."""

    choices: tuple[Path_, ...]  # sorted by (depth, path)
    topk: int  # ranks per head in the candidate pool
    source_index: np.ndarray  # [N] int64, node -> index into the candidate pool
    depth: np.ndarray  # [N] int64, root = 0
    parent: np.ndarray  # [N] int64, root = -1
    mask: np.ndarray  # [N, N] bool, ancestors-or-self
    paths_nodes: np.ndarray  # [L, max_depth + 1] int64, root-to-leaf node indices, -1 padded
    extras: dict = field(default_factory=dict, compare=False)

    @property
    def num_nodes(self) -> int:
        return int(self.depth.shape[0])

    @property
    def max_depth(self) -> int:
        return int(self.depth.max())

    @classmethod
    def from_choices(cls, choices: Iterable[Sequence[int]], topk: int, num_heads: int | None = None) -> "Tree":
        """Validate ``choices`` and build the buffers. Errors name the offending path."""
        paths = list(_checked_paths(list(choices) if not isinstance(choices, (list, tuple)) else choices,
                                    "the tree given"))
        validate_choices(paths, topk=topk, num_heads=num_heads)
        paths.sort(key=lambda p: (len(p), p))
        index = {p: i + 1 for i, p in enumerate(paths)}
        n = len(paths) + 1
        source = np.zeros(n, np.int64)
        depth = np.zeros(n, np.int64)
        parent = np.full(n, -1, np.int64)
        mask = np.eye(n, dtype=bool)
        for p, i in index.items():
            d = len(p)
            source[i] = 1 + (d - 1) * topk + p[-1]
            depth[i] = d
            parent[i] = index.get(p[:-1], 0)
            mask[i] = mask[parent[i]]
            mask[i, i] = True
        is_parent = np.zeros(n, bool)
        is_parent[parent[1:]] = True
        leaves = [i for i in range(n) if not is_parent[i]]
        max_d = int(depth.max())
        paths_nodes = np.full((len(leaves), max_d + 1), -1, np.int64)
        for row, leaf in enumerate(leaves):
            chain_ = []
            node = leaf
            while node >= 0:
                chain_.append(node)
                node = parent[node]
            paths_nodes[row, : len(chain_)] = chain_[::-1]
        return cls(tuple(paths), topk, source, depth, parent, mask, paths_nodes)

    def to_json(self) -> list[list[int]]:
        return [list(p) for p in self.choices]


def validate_choices(paths: Sequence[Path_], topk: int, num_heads: int | None) -> None:
    """Every prefix present, no duplicates, depth <= heads, 0 <= rank < topk."""
    seen: set[Path_] = set()
    for p in paths:
        if len(p) == 0:
            raise TreeError("tree has an empty path: the root is implicit, list only paths of length >= 1")
        if p in seen:
            raise TreeError(f"tree path {list(p)} appears twice: remove the duplicate")
        seen.add(p)
        if num_heads is not None and len(p) > num_heads:
            raise TreeError(
                f"tree path {list(p)} has depth {len(p)} but there are only {num_heads} Medusa heads: "
                f"use a tree at most {num_heads} deep or heads with more heads"
            )
        bad = [r for r in p if r < 0 or r >= topk]
        if bad:
            raise TreeError(f"tree path {list(p)} uses rank {bad[0]}, outside 0..{topk - 1} (top-k is {topk})")
    for p in paths:
        if len(p) > 1 and p[:-1] not in seen:
            raise TreeError(f"tree path {list(p)} has no parent {list(p[:-1])}: every prefix of a path must be a node")
