"""The lanes graph on ONNX Runtime: one step over the rows of several sequences (`exporter/lanes_graph.py`).

    lanes = OrtLanes(session, dims, lanes=8)
    outs = lanes.run([Lane(session_a, tokens_a, 1.0), None, Lane(session_b, tokens_b, 0.7)])   # `lanes.Lane`
    lanes.keep(session_a, np.arange(n))   # commit the first n of lane 0's new KV rows (all of a prompt chunk, the
                                          # accepted part of a chain of drafts)

Each lane is one sequence (the contract: `lanes.py`): a prefill chunk, or its next token and a chain of drafts,
after the rows its KV cache holds. Its KV buffers (its `OrtSession`'s `SlotCache` slot 0, the same memory the
one-sequence graphs use) are bound as the lane's past and present, and GroupQueryAttention writes the new rows in place. The attention inputs are built here exactly as the
one-sequence graph builds them from its mask (`padded_bias`), so a lane's numbers equal a one-sequence step's.
"""

from __future__ import annotations

import threading

import numpy as np

from .. import io_table
from .base import ModelDims, Session
from .lanes import Lane, LaneOutput
from .ort_errors import run_bound
from .ort_outputs import first_outputs, selects_rows, unbind_outputs
from .slot_cache import SlotCache

_REDUCED = [t.name for t in io_table.lanes_reduced_outputs()]


def padded_bias(past: int, rows: int, dtype=np.float32) -> np.ndarray:
    """The additive mask the one-sequence graph gives GroupQueryAttention for ``rows`` causal rows after ``past``:
    the rows, then the extra row (a copy of the last row that also sees itself), over ``past + rows + 1`` keys."""
    total = past + rows + 1
    if rows == 1:  # a decoding lane's one token, every step: the row sees all but the extra row's key, which sees all
        bias = np.zeros((1, 1, 2, total), dtype)
        bias[0, 0, 0, total - 1] = -np.inf
        return bias
    keys = np.arange(total)
    limit = np.append(past + np.arange(rows), past + rows - 1)  # the last key each row sees
    bias = np.where(keys[None, :] <= limit[:, None], 0.0, -np.inf).astype(dtype)
    bias[rows, total - 1] = 0.0  # the extra row sees its own key
    return bias[None, None]


def padded_positions(past: int, rows: int) -> np.ndarray:
    pos = np.arange(past, past + rows + 1, dtype=np.int64)
    pos[-1] = pos[-2] if rows else past
    return pos[None]


class OrtLanes:
    """Bindings persist across steps: a lane's KV buffers are bound again only when another cache takes the lane
    (binding them costs ~25 µs a tensor, 120 per lane for the default model: more than a step's attention), so
    callers keep each sequence in the same lane (`Engine` uses its KV slot's index)."""

    def __init__(self, session, dims: ModelDims, lanes: int, min_rows: int = 1) -> None:
        self.session, self.dims, self.lanes, self.min_rows = session, dims, lanes, min_rows
        self.selects_rows = selects_rows(session)
        self.binding = session.io_binding()
        # Graphs built with the attention kernel read each lane's rows where they are: no gather indices.
        self.gathers = "lane_gather" in {i.name for i in session.get_inputs()}
        self.elem, self.kv_elem = io_table.model_dtype_of(dims.dtype), dims.cache_np
        n = dims.num_layers
        self.past = [io_table.lane_kv_names(n, b, "past_key_values") for b in range(lanes)]
        self.present = [io_table.lane_kv_names(n, b, "present") for b in range(lanes)]
        self.scratch = [SlotCache(dims, 2) for _ in range(lanes)]  # what an empty lane's attention writes
        self.bound: list[tuple | None] = [None] * lanes
        self.empty_bias = np.zeros((1, 1, 1, 1), self.elem)  # an empty lane's (never written: bound as it is)
        self.lock = threading.Lock()
        for name in _REDUCED:  # first: get_outputs() follows the order of first binding
            self.binding.bind_output(name, "cpu")

    def run(self, lanes: list[Lane | None]) -> list[LaneOutput | None]:
        """One step; ``lanes[i]`` is lane i's sequence (None: empty). One output per lane (None where empty)."""
        with self.lock:  # one binding serves every engine on this backend (two batchers, two generate_many calls)
            return self._run(lanes)

    def _run(self, lanes: list[Lane | None]) -> list[LaneOutput | None]:
        if len(lanes) > self.lanes or not any(lanes):
            raise ValueError(f"a lanes step takes 1 to {self.lanes} sequences")
        b = self.binding
        offsets, temps, gather, sizes, wanted = [0], [], [], [], []
        for i in range(self.lanes):
            lane = lanes[i] if i < len(lanes) else None
            kv = lane.session.kv if lane else self.scratch[i]
            past, rows = (kv.length, len(lane.tokens)) if lane else (0, 0)
            if lane:
                if past + rows + 1 > kv.capacity:
                    raise ValueError(f"lane {i}: {past} + {rows} rows do not fit a KV buffer of {kv.capacity}")
                first = lane.first_output()
                wanted += range(offsets[-1] + first, offsets[-1] + rows)
                temps += [lane.temperature] * (rows - first)
                kv.prepare(rows, 1)
            start = offsets[-1] + 1  # + 1: index 0 is the zero row
            gather += list(range(start, start + rows)) + [start + rows - 1 if rows else 0]  # rows, extra row
            sizes.append(rows + 1)
            offsets.append(offsets[-1] + rows)
            b.bind_cpu_input(f"position_ids.{i}", padded_positions(past, rows))
            b.bind_cpu_input(f"attention_bias.{i}", padded_bias(past, rows, self.elem) if lane else self.empty_bias)
            self._bind_kv(i, kv)
        tokens = np.concatenate([lane.tokens for lane in lanes if lane]).astype(np.int64)
        b.bind_cpu_input("input_ids", tokens[None])
        b.bind_cpu_input("lane_sizes", np.asarray(sizes, np.int64))
        if self.gathers:
            b.bind_cpu_input("lane_gather", np.asarray(gather, np.int64))
            lane_starts = np.cumsum([0] + sizes[:-1])
            b.bind_cpu_input("row_gather", np.concatenate([lane_starts[i] + np.arange(offsets[i + 1] - offsets[i])
                                                            for i in range(self.lanes)]).astype(np.int64))
        selected, temps = self._selection(wanted, temps, offsets[-1])
        b.bind_cpu_input("row_temperature", np.asarray(temps, np.float32)[None])
        unbind_outputs(b, _REDUCED)  # unallocated again: their shapes change with the rows
        run_bound(self.session, b, "lanes graph")
        ids, probs, entropy = (v[0] for v in first_outputs(b, len(_REDUCED)))
        where = {row: i for i, row in enumerate(selected)}  # output row of each step row computed
        outs: list[LaneOutput | None] = []
        for lane, start in zip(lanes, offsets):
            if lane is None:
                outs.append(None)
                continue
            at = [where[start + r] for r in range(lane.first_output(), len(lane.tokens))]
            outs.append(LaneOutput(ids[at], probs[at], entropy[at]))
        return outs

    def keep(self, session: Session, rows: np.ndarray) -> None:
        session.kv.keep(rows)  # slot 0, where the lane's rows went

    def _selection(self, wanted: list[int], temps: list[float], rows: int) -> tuple[list[int], list[float]]:
        """The step rows the tail computes and their temperatures, bound as ``output_rows``: the wanted rows, padded
        with copies of the first to at least one row and ``min_rows`` (a quantized matmul's last bits depend on
        whether it sees one row or more: `exporter/quantize.RECIPES`). Graphs without the input compute every row."""
        if not self.selects_rows:
            all_temps = np.ones(rows, np.float32)
            all_temps[wanted] = temps
            return list(range(rows)), list(all_temps)
        pad = max(1, min(self.min_rows, rows)) - len(wanted)
        if pad > 0:
            first = wanted[0] if wanted else 0
            wanted, temps = [first] * pad + wanted, [temps[0] if temps else 1.0] * pad + temps
        self.binding.bind_cpu_input(io_table.row_selection_input().name, np.asarray(wanted, np.int64))
        return wanted, temps

    def _bind_kv(self, i: int, kv: SlotCache) -> None:
        key = (id(kv.store), kv.store.ctypes.data)
        if self.bound[i] == key:
            return
        b = self.binding
        for name_in, name_out, view in zip(self.past[i], self.present[i], kv.buffers(1)):
            b.bind_input(name_in, "cpu", 0, self.kv_elem, list(view.shape), view.ctypes.data)
            b.bind_output(name_out, "cpu", 0, self.kv_elem, list(view.shape), view.ctypes.data)
        self.bound[i] = key
