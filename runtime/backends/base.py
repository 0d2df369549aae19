"""The small interface every backend implements (PyTorch reference, ONNX Runtime, TensorRT).

A `Backend` is loaded once and shared; `new_session(capacity)` gives one request its own KV buffers.
`Session.run` feeds T tokens after the committed prefix (the tree mask says which of the T each sees)
and stages their KV rows; `Session.keep` commits some of them, in order. Nothing else crosses the
boundary, so the decode loop is the same for every backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Mapping

import numpy as np

from .. import io_table
from ..errors import InputError
from ..typed_json import FieldError


@dataclass(frozen=True)
class ModelDims:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_heads: int  # Medusa heads (0: none)
    head_topk: int  # ranks per head in `medusa_token_ids`
    sample_topk: int  # ranks in `next_token_ids`
    dtype: str = "float32"  # model dtype (activations, and the KV cache unless kv_dtype): "float32" | "float16"
    kv_dtype: str | None = None  # the KV cache's, where it differs: "float16" caches of an fp32 kernel graph

    def __post_init__(self) -> None:
        """Sizes an artifact's manifest may not get wrong (`runtime.manifest` reads them through this)."""
        for name in ("num_layers", "num_kv_heads", "head_dim", "vocab_size", "head_topk", "sample_topk", "num_heads"):
            value, least = getattr(self, name), 0 if name == "num_heads" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise FieldError(name, f"must be an integer of at least {least}, not {value!r:.20}")
        for name in ("dtype", "kv_dtype"):
            value = getattr(self, name)
            if value not in io_table.MODEL_DTYPES and (name == "dtype" or value is not None):
                raise FieldError(name, f"must be one of {', '.join(map(repr, io_table.MODEL_DTYPES))}, not {value!r:.20}")
        if self.sample_topk > self.vocab_size or self.head_topk > self.vocab_size:
            raise FieldError("sample_topk", "and head_topk must not exceed vocab_size")

    @property
    def cache_dtype(self) -> str:
        """What the KV cache holds: ``kv_dtype``, else the model dtype."""
        return self.kv_dtype or self.dtype

    @property
    def cache_np(self) -> np.dtype:
        return io_table.model_dtype_of(self.cache_dtype)

    @property
    def cache_differs(self) -> bool:
        """The KV cache holds another dtype than the model's (an fp16 cache of an fp32 kernel graph)."""
        return self.cache_dtype != self.dtype


# (graph name, StepOutput field, dtype) of every reduced output: read at every step, built once.
_REDUCED_FIELDS = tuple((t.name, t.field, t.numpy_dtype()) for t in io_table.reduced_outputs(medusa=True))


@dataclass
class StepOutput:
    """Per-position results of one forward, all numpy, batch dimension dropped."""

    next_ids: np.ndarray  # [T, S] int64, base model's top-S, best first
    next_probs: np.ndarray  # [T, S] float32 at the requested temperature
    input_probs: np.ndarray  # [T, T] float32, [i, j] = p_i(token j of the input)
    entropy: np.ndarray  # [T] float32
    medusa_ids: np.ndarray | None  # [T, K, R] int64, heads' top-R; None for vanilla runs

    @classmethod
    def from_named(cls, outputs: Mapping[str, np.ndarray]) -> "StepOutput":
        """From a graph's reduced outputs keyed by their I/O-table names, batch dimension dropped. Each is
        cast to the table's dtype (engines may emit int32 ids or fp16 probabilities); a missing
        ``medusa_token_ids`` means a vanilla run."""
        values = {field: np.asarray(outputs[name], dtype) if name in outputs else None
                  for name, field, dtype in _REDUCED_FIELDS}
        missing = [name for name in _REQUIRED_FIELDS if values[name] is None]
        if missing:
            raise ValueError(f"step outputs lack {missing}: the graph does not follow the I/O table")
        return cls(**values)


_REQUIRED_FIELDS = tuple(f.name for f in fields(StepOutput) if f.name != "medusa_ids")  # every graph's outputs


class Session(ABC):
    """One request's state on a backend: committed length, capacity, staged rows.

    Use as a context manager (or call `close`) to hand its buffers back at once; a finalizer only
    catches sessions that were dropped without it."""

    capacity: int
    length: int

    @property
    def kv_bytes(self) -> int:
        """Bytes its preallocated KV cache holds (what the server reports at start)."""
        return 0

    def close(self) -> None:
        """Release the session's buffers (idempotent)."""

    def reset(self) -> None:
        """Forget the committed rows, keeping the buffers, so that the session serves a new sequence."""
        raise NotImplementedError(f"{type(self).__name__} cannot be reused for another sequence")

    def rewind(self, length: int) -> None:
        """Keep only the first ``length`` committed rows, so that a new sequence sharing those tokens continues from
        them (`Backend.reuses_rows`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot keep part of its rows")

    def copy_rows(self, other: "Session", length: int) -> None:
        """Hold exactly ``other``'s first ``length`` committed rows (a running sequence's shared prefix)."""
        raise NotImplementedError(f"{type(self).__name__} cannot take another session's rows")

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @abstractmethod
    def run(self, input_ids: np.ndarray, position_ids: np.ndarray, tree_mask: np.ndarray,
            medusa: bool, temperature: float, out_rows: np.ndarray | None = None) -> StepOutput:
        """Forward ``input_ids`` [T] after the committed prefix; ``tree_mask`` [T, T] bool. ``out_rows``: the rows
        whose per-position outputs the caller reads (None: all). A backend whose graph can compute only those
        returns them, in order; others return all T rows, so a caller that wants the last asked row reads row
        -1 (and asks only for a last row)."""

    @abstractmethod
    def keep(self, rows: np.ndarray) -> None:
        """Commit the staged rows ``rows`` (indices into the last run's T, increasing) after the prefix."""


class Backend(ABC):
    """A loaded model on one engine. ``notes``: things the user should see (e.g. an engine tuned on
    another GPU). Close it (or use ``with``) to free its sessions, engines and device memory."""

    name: str
    dims: ModelDims
    max_seq: int
    notes: tuple[str, ...] = ()
    max_paths: int | None = None  # root-to-leaf paths of a tree the Medusa graph verifies (None: any)
    whole_tree_steps = False  # the Medusa graph's steps take only its whole tree (TensorRT's fixed-shape profile)
    lanes = None  # the batched-step runner (`lanes.LanesRunner`), when the artifact has one: `OrtLanes`, `TrtLanes`
    # Rows of a prompt chunk a request running alone feeds per step when others may join (None: the engine's
    # --max-num-batched-tokens). On a GPU a chunk costs about as much as one token, so its prefill profile's size.
    alone_prefill_chunk: int | None = None
    # Whether a run's input_token_probs holds every pair of its rows (prompt_logprobs reads row j - 1's probability of
    # token j): TensorRT splits a long run over its profiles and fills only each piece's own block.
    scores_prompts = True
    # Whether a committed KV row is a function of its tokens alone, bit for bit, however they went in (prompt chunks of
    # any size, one-token, tree or lanes steps): then a sequence may start from another's rows for the tokens they share
    # (`prefix_reuse.py`) and its answer is the one a fresh prefill gives. Declared by backends whose tests show it.
    reuses_rows = False

    @property
    def has_medusa(self) -> bool:
        return self.dims.num_heads > 0

    def close(self) -> None:
        """Release the loaded graphs or engines (idempotent); sessions opened from it must be closed first."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @abstractmethod
    def new_session(self, capacity: int | None = None) -> Session:
        """A fresh request state with KV room for ``capacity`` tokens (default: the backend's max)."""


class MaskBuffer:
    """Builds the ``[1, 1, T, past+T]`` attention mask as a contiguous view of one reused flat buffer:
    every new token sees the whole committed prefix, and the new tokens see each other per ``tree_mask``.
    The buffer grows by doubling, so steady-state steps allocate nothing."""

    def __init__(self) -> None:
        self.buffer = np.zeros(0, bool)

    def build(self, past: int, tree_mask: np.ndarray) -> np.ndarray:
        t = tree_mask.shape[0]
        need = t * (past + t)
        if need > self.buffer.size:
            self.buffer = np.zeros(max(need, 2 * self.buffer.size), bool)
        m = self.buffer[:need].reshape(1, 1, t, past + t)
        m[..., :past] = True
        m[0, 0, :, past:] = tree_mask
        return m


class KVCache:
    """Preallocated per-layer sequence-major KV buffers ``[1, capacity, kv_heads, head_dim]``: `past` is the
    committed prefix (a contiguous view, bound without a copy) and `stage` the view where the step's T new
    rows go. (Fused graphs' head-major shared buffers: `slot_cache.SlotCache`.)

    ``alloc(shape)`` makes one zeroed buffer: numpy by default; the PyTorch backend passes a torch
    allocator (CPU or CUDA), and indexing works the same for both.

    A step writes its T rows at ``[length:length+T]``; `keep` moves the accepted ones down to
    ``[length:length+n]`` so rejected branches never stay visible.
    """

    def __init__(self, dims: ModelDims, capacity: int, alloc=None) -> None:
        shape = (1, capacity, dims.num_kv_heads, dims.head_dim)
        alloc = alloc or (lambda s: np.zeros(s, dims.cache_np))
        self.keys = [alloc(shape) for _ in range(dims.num_layers)]
        self.values = [alloc(shape) for _ in range(dims.num_layers)]
        self.capacity = capacity
        self.length = 0
        self.staged = 0

    @property
    def nbytes(self) -> int:
        return sum(int(b.nbytes) for b in self.buffers())  # numpy arrays and torch tensors alike

    def buffers(self) -> list[np.ndarray]:
        """Flat list in io_table order: layer 0 key, layer 0 value, layer 1 key, ..."""
        return [b for pair in zip(self.keys, self.values) for b in pair]

    def past(self) -> list[np.ndarray]:
        return [b[:, : self.length] for b in self.buffers()]

    def stage(self, t: int) -> list[np.ndarray]:
        """Where the next run's T new rows go."""
        self.staged = t
        return [b[:, self.length:self.length + t] for b in self.buffers()]

    def rows(self, start: int, stop: int) -> list[np.ndarray]:
        """Rows ``[start, stop)`` of every buffer, ``[1, n, kv_heads, head_dim]`` (for checks)."""
        return [b[:, start:stop] for b in self.buffers()]

    def reset(self) -> None:
        self.length = self.staged = 0

    def rewind(self, length: int) -> None:
        """Only the first ``length`` committed rows stay."""
        self.length, self.staged = min(self.length, length), 0

    def copy_rows(self, other: "KVCache", length: int) -> None:
        """Exactly ``other``'s first ``length`` committed rows."""
        length = min(length, other.length)
        for mine, theirs in zip(self.buffers(), other.buffers()):
            mine[:, :length] = theirs[:, :length]
        self.length, self.staged = length, 0

    def keep(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, np.int64)
        if rows.size and (rows.max() >= self.staged or np.any(np.diff(rows) <= 0)):
            raise ValueError(f"keep(rows={rows.tolist()}) needs increasing indices below {self.staged}")
        n = len(rows)
        if not np.array_equal(rows, np.arange(n)):
            # rows[i] >= i, so copying in increasing order never overwrites a row still to be read.
            src = (self.length + rows).tolist()
            for b in self.buffers():
                b[:, self.length:self.length + n] = b[:, src]
        self.length += n
        self.staged = 0


def runtime_closed(while_running: bool = False) -> InputError:
    """What every backend raises for a request on a closed runtime (``while_running``: one that its close cut short)."""
    what = "was closed while the request ran" if while_running else "is closed"
    return InputError(f"this runtime {what}: load the artifact again (MedusaRuntime.load)")
