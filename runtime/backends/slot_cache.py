"""Head-major shared KV buffers with several copies ("slots") of one request's cache, for exact tree
verification per path (`runtime.tree_paths`): path b's head group reads and writes slot b.

    kv = SlotCache(dims, capacity)
    views = kv.stage(t, slots=3)     # per layer [1, 3 * kv_heads, capacity, head_dim]; slots 1, 2 brought up to date
    ...graph writes rows [length, length + t) of each slot...
    kv.keep(np.arange(n), slot=2)    # commit the first n rows of slot 2 (an accepted path)

Slot 0 always holds the committed cache. The others are brought up to date lazily, only the rows they miss,
just before a batch uses them, so plain steps copy nothing and a path step copies a few rows per slot. All
layers live in one array, so each copy is one numpy operation.
"""

from __future__ import annotations

import mmap

import numpy as np

from ..errors import BackendUnavailableError
from .base import ModelDims


class SlotCache:
    def __init__(self, dims: ModelDims, capacity: int, slots: int = 1) -> None:
        self.dims, self.capacity = dims, capacity
        self.store = self._alloc(slots)
        self.synced = [0] * slots  # rows [0, synced[s]) of slot s equal slot 0's
        self.length = 0
        self.staged = 0
        self.used = 1  # slots the last run wrote

    def _alloc(self, slots: int) -> np.ndarray:
        d = self.dims
        shape = (2 * d.num_layers, slots, d.num_kv_heads, self.capacity, d.head_dim)
        return small_page_zeros(shape, d.cache_np)

    def reset(self) -> None:
        """Empty, keeping the memory (a new sequence in a reused slot)."""
        self.length = self.staged = 0
        self.synced = [0] * self.slots
        self.used = 1

    def rewind(self, length: int) -> None:
        """Only the first ``length`` committed rows stay (the other slots' copies of them stay in step)."""
        self.length, self.staged, self.used = min(self.length, length), 0, 1
        self.synced = [min(s, self.length) for s in self.synced]

    def copy_rows(self, other: "SlotCache", length: int) -> None:
        """Exactly ``other``'s first ``length`` committed rows (its slot 0's), in slot 0; the other slots sync later."""
        length = min(length, other.length)
        self.store[:, 0, :, :length] = other.store[:, 0, :, :length]
        self.length, self.staged, self.used = length, 0, 1
        self.synced = [0] * self.slots

    @property
    def nbytes(self) -> int:
        return int(self.store.nbytes)

    @property
    def slots(self) -> int:
        return self.store.shape[1]

    def buffers(self, slots: int = 1) -> list[np.ndarray]:
        """Per layer, key then value (io_table order): slots ``[0, slots)`` as one ``[1, slots * kv_heads,
        capacity, head_dim]`` view (the head groups of a per-path graph)."""
        _, _, kvh, cap, hd = self.store.shape
        return [self.store[j, :slots].reshape(1, slots * kvh, cap, hd) for j in range(self.store.shape[0])]

    def stage(self, t: int, slots: int = 1) -> list[np.ndarray]:
        """The buffers the next run reads and writes (its T rows land at ``length`` in each slot)."""
        self.prepare(t, slots)
        return self.buffers(slots)

    def prepare(self, t: int, slots: int = 1) -> None:
        """`stage` without making the views (sessions whose bindings already hold these buffers: 60 views a step
        for the default model)."""
        if slots > self.slots:
            grown = self._alloc(slots)
            # The committed rows only (the other slots' synced rows are among them): copying whole buffers would
            # fault in their full capacity.
            grown[:, : self.slots, :, : self.length] = self.store[:, :, :, : self.length]
            self.store, self.synced = grown, self.synced + [0] * (slots - self.slots)
        for s in range(1, slots):
            lo = self.synced[s]
            if lo < self.length:
                self.store[:, s, :, lo:self.length] = self.store[:, 0, :, lo:self.length]
                self.synced[s] = self.length
        self.staged, self.used = t, slots

    def keep(self, rows: np.ndarray, slot: int = 0) -> None:
        """Commit the staged ``rows`` (increasing) of ``slot`` after the prefix; slot 0 receives them."""
        rows = np.asarray(rows, np.int64)
        n = len(rows)
        # Increasing rows: the last is the largest. Scalar checks first: a plain step commits its one row every step.
        if n and (rows[-1] >= self.staged or n > 1 and np.any(np.diff(rows) <= 0)) or slot >= self.used:
            raise ValueError(f"keep(rows={rows.tolist()}, slot={slot}) needs increasing rows below {self.staged} "
                             f"of a slot below {self.used}")
        start = self.length
        prefix = n == 0 or rows[0] == 0 and rows[-1] == n - 1  # increasing: exactly the first n staged rows
        if slot or not prefix:
            src = self.store[:, slot][:, :, start + rows]  # fancy index: a copy, safe to write back
            self.store[:, 0, :, start:start + n] = src
        for s in range(1, self.used):  # the run overwrote their rows from `start`
            self.synced[s] = min(self.synced[s], start)
        if slot and prefix:
            self.synced[slot] = start + n
        self.length += n
        self.staged = 0

    def rows(self, start: int, stop: int) -> list[np.ndarray]:
        """Committed rows ``[start, stop)`` per buffer, sequence-major ``[1, n, kv_heads, head_dim]`` (checks)."""
        return [b[:, :, start:stop].transpose(0, 2, 1, 3) for b in self.buffers(1)]


def small_page_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array in its own private anonymous memory mapping, kept off transparent huge pages.

    numpy puts arrays of 4 MiB and more on huge pages (madvise). A step touches every layer's and head's buffer of a
    KV store, so on huge pages the first step of a new store faulted in all of it (90 MiB for the default model),
    zeroing 2 MiB per fault: 0.15-0.25 s per store in a fresh process on the measured machine (docs/results.md, "KV
    memory pages"). On small pages a store is faulted in as rows are written: it costs memory for the rows it has
    held, not for its capacity."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype)
    # Private (as malloc's memory: not shared with a forked child); fd -1 makes it anonymous: zero-filled,
    # unmapped when the array is freed. Windows' mmap takes no flags (and has no transparent huge pages).
    private = {"flags": mmap.MAP_PRIVATE} if hasattr(mmap, "MAP_PRIVATE") else {}
    try:
        memory = mmap.mmap(-1, nbytes, **private)
    except OSError as e:  # ENOMEM: a memory limit (ulimit -v, a container's) below the KV cache's capacity
        raise BackendUnavailableError(f"cannot reserve {nbytes / 2**20:.0f} MiB for a KV cache "
                                      f"({e.strerror or e}): raise the memory limit, or use an artifact built with "
                                      f"a smaller --max-seq (or serve fewer --max-num-seqs)") from None
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
        try:
            memory.madvise(mmap.MADV_NOHUGEPAGE)
        except OSError:  # a kernel built without transparent huge pages refuses the advice: nothing to avoid
            pass
    return np.frombuffer(memory, dtype).reshape(shape)
