"""TensorRT optimization profiles as the runtime reads them from the manifest, and which profile a step uses
(pure Python).

    profiles = [Profile.from_record(p) for p in manifest.engines["medusa"].profiles]
    select(profiles, t=11, past=300)         # index of the profile that runs this step, or None
    plan_chunks(profiles, t=900, past=0)     # a long causal prefill split into runs that each fit
    step_runs(profiles, t, past, tree_mask)  # either of those for a step; no_profile(...) its one-line error

A profile describes B sequences of T new tokens after ``past`` cached ones; the attention mask is
``[B, 1, T, past + T]`` and the KV inputs ``[B, past, kv_heads, head_dim]``. One-sequence profiles (B = 1) serve a
session's steps (`select`, `plan_chunks`); the vanilla engine's "batch" profile (B up to the lanes) serves the
batched steps (`trt_lanes.py`). TensorRT checks the min, opt and max shapes of a profile as three consistent sets,
so ``total = past + T`` holds at each of them. Which profiles an engine gets is the builder's choice
(``medusa_export.engines.profiles``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import io_table
from ..errors import InputError
from ..manifest import ProfileRecord


@dataclass(frozen=True)
class _KvDims:
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Profile:
    name: str
    seq: tuple[int, int, int]  # T: min, opt, max
    past: tuple[int, int, int]  # past length: min, opt, max
    batch: tuple[int, int, int] = (1, 1, 1)  # sequences per step: min, opt, max

    def __post_init__(self) -> None:
        for label, r in (("T", self.seq), ("past", self.past), ("batch", self.batch)):
            if not (0 <= r[0] <= r[1] <= r[2]):
                raise ValueError(f"profile {self.name}: {label} range {r} is not min <= opt <= max")
        if self.seq[0] < 1 or self.batch[0] < 1:
            raise ValueError(f"profile {self.name}: T and the batch must be at least 1")

    @property
    def batched(self) -> bool:
        """Takes several sequences per step (the batch profile), not a session's one."""
        return self.batch[2] > 1

    @property
    def total(self) -> tuple[int, int, int]:
        return tuple(p + t for p, t in zip(self.past, self.seq))

    def fits(self, t: int, past: int) -> bool:
        return self.seq[0] <= t <= self.seq[2] and self.past[0] <= past <= self.past[2]

    def shapes(self, num_layers: int, kv_heads: int, head_dim: int) -> dict[str, tuple[tuple, tuple, tuple]]:
        """(min, opt, max) shape of every dynamic graph input (``temperature`` is static and left out),
        from the I/O table."""
        dims = _KvDims(kv_heads, head_dim)
        out = {}
        for tensor in io_table.inputs(num_layers):
            if tensor.name == "temperature":
                continue
            out[tensor.name] = tuple(
                tensor.shape(dims, {io_table.BATCH: b, io_table.SEQ: t, io_table.PAST: p, io_table.TOTAL: p + t})
                for t, p, b in zip(self.seq, self.past, self.batch))
        return out

    def to_record(self) -> ProfileRecord:
        return ProfileRecord(self.name, self.seq, self.past, self.total, self.batch)

    @classmethod
    def from_record(cls, record: ProfileRecord) -> "Profile":
        return cls(record.name, tuple(record.seq), tuple(record.past), tuple(record.batch))


def select(profiles: list[Profile], t: int, past: int) -> int | None:
    """Index of the one-sequence profile for T new tokens after ``past``: the narrowest T range that fits (a
    fixed-T step profile wins over the prefill range), or None."""
    fitting = [i for i, p in enumerate(profiles) if not p.batched and p.fits(t, past)]
    if not fitting:
        return None
    return min(fitting, key=lambda i: (profiles[i].seq[2] - profiles[i].seq[0], i))


def plan_chunks(profiles: list[Profile], t: int, past: int) -> list[tuple[int, int, int]] | None:
    """Split T tokens after ``past`` into ``(start, end, profile)`` runs that each fit a profile, largest
    first; one run when a profile fits all T. None when no split fits. Only valid for a causal mask (each
    run sees the runs before it as its past)."""
    whole = select(profiles, t, past)
    if whole is not None:
        return [(0, t, whole)]
    runs, a = [], 0
    while a < t:
        best = None
        for i, p in enumerate(profiles):
            if p.batched or not p.past[0] <= past + a <= p.past[2]:
                continue
            n = min(t - a, p.seq[2])
            if n >= p.seq[0] and (best is None or n > best[1]):
                best = (i, n)
        if best is None:
            return None
        runs.append((a, a + best[1], best[0]))
        a += best[1]
    return runs


def step_runs(profiles: list[Profile], t: int, past: int, tree_mask: np.ndarray) -> list[tuple[int, int, int]] | None:
    """``(start, end, profile)`` runs of a T-token step after ``past`` on an engine with ``profiles``: one profile,
    or causal chunks (a causal ``tree_mask`` only); None when its profiles cannot take it."""
    idx = select(profiles, t, past)
    if idx is not None:
        return [(0, t, idx)]
    return plan_chunks(profiles, t, past) if np.array_equal(tree_mask, np.tri(t, dtype=bool)) else None


def no_profile(kind: str, profiles: list[Profile], t: int, past: int, tree_mask: np.ndarray) -> None:
    """The one-line InputError for a step no one-sequence profile of the ``kind`` engine takes."""
    desc = "; ".join(f"{p.name}: T {p.seq[0]}..{p.seq[2]}, past {p.past[0]}..{p.past[2]}" for p in profiles
                     if not p.batched)
    if np.array_equal(tree_mask, np.tri(t, dtype=bool)):
        raise InputError(f"{t} tokens after {past} do not fit the {kind} engine's profiles ({desc}): "
                         f"rebuild the engines with a larger --max-prompt")
    raise InputError(f"a {t}-token tree step does not fit the {kind} engine's profiles ({desc}): use the "
                     f"artifact's own tree, or rebuild the engines for this tree "
                     f"(`medusa-export build --tree ... --engine trt`)")
