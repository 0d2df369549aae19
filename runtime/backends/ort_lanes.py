"""The lanes graph on ONNX Runtime: one step over the rows of several sequences (`exporter/lanes_graph.py`).

    lanes = OrtLanes(session, dims, lanes=8)
    outs = lanes.run([Lane(kv_a, tokens_a, temperature), Lane(kv_b, tokens_b, 0.0)])   # one output per lane
    outs[0].next_ids            # [rows of lane 0, S]; the lanes' new KV rows are committed in their caches

Each lane is one sequence: a prefill chunk or its next token, after the rows its KV cache holds. Its KV buffers
(a `SlotCache`'s slot 0, the same memory its own one-sequence session uses) are bound as the lane's past and
present, and GroupQueryAttention writes the new rows in place. The attention inputs are built here exactly as the
one-sequence graph builds them from its mask (`padded_bias`), so a lane's numbers equal a one-sequence step's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import io_table
from .base import ModelDims
from .slot_cache import SlotCache

_REDUCED = [t.name for t in io_table.lanes_reduced_outputs()]


@dataclass
class Lane:
    kv: SlotCache  # the sequence's cache; its rows [0, kv.length) are the past
    tokens: np.ndarray  # [t] int64, t >= 1
    temperature: float  # of this sequence's probabilities (1.0 for greedy)


@dataclass
class LaneOutput:
    next_ids: np.ndarray  # [t, S]
    next_probs: np.ndarray  # [t, S]
    entropy: np.ndarray  # [t]


def padded_bias(past: int, rows: int, dtype=np.float32) -> np.ndarray:
    """The additive mask the one-sequence graph gives GroupQueryAttention for ``rows`` causal rows after ``past``:
    the rows, then the extra row (a copy of the last row that also sees itself), over ``past + rows + 1`` keys."""
    total = past + rows + 1
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
    def __init__(self, session, dims: ModelDims, lanes: int) -> None:
        self.session, self.dims, self.lanes = session, dims, lanes
        self.binding = session.io_binding()
        self.elem = io_table.model_dtype_of(dims.dtype)
        n = dims.num_layers
        self.past = [io_table.lane_kv_names(n, b, "past_key_values") for b in range(lanes)]
        self.present = [io_table.lane_kv_names(n, b, "present") for b in range(lanes)]
        self.scratch = SlotCache(dims, 2)  # what an empty lane's attention writes

    def run(self, lanes: list[Lane]) -> list[LaneOutput]:
        if not 1 <= len(lanes) <= self.lanes:
            raise ValueError(f"a lanes step takes 1 to {self.lanes} sequences, got {len(lanes)}")
        b = self.binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        for name in _REDUCED:  # first: get_outputs() follows the binding order
            b.bind_output(name, "cpu")
        offsets, temps = [0], []
        for i in range(self.lanes):
            lane = lanes[i] if i < len(lanes) else None
            kv, past, rows = (lane.kv, lane.kv.length, len(lane.tokens)) if lane else (self.scratch, 0, 0)
            if lane:
                if past + rows + 1 > kv.capacity:
                    raise ValueError(f"lane {i}: {past} + {rows} rows do not fit a KV buffer of {kv.capacity}")
                temps += [lane.temperature] * rows
                kv.stage(rows, 1)
            offsets.append(offsets[-1] + rows)
            b.bind_cpu_input(f"position_ids.{i}", padded_positions(past, rows))
            b.bind_cpu_input(f"attention_bias.{i}", padded_bias(past, rows, self.elem) if lane else
                             np.zeros((1, 1, 1, 1), self.elem))
            for name_in, name_out, view in zip(self.past[i], self.present[i], kv.buffers(1)):
                b.bind_input(name_in, "cpu", 0, self.elem, list(view.shape), view.ctypes.data)
                b.bind_output(name_out, "cpu", 0, self.elem, list(view.shape), view.ctypes.data)
        tokens = np.concatenate([lane.tokens for lane in lanes]).astype(np.int64)
        b.bind_cpu_input("input_ids", tokens[None])
        b.bind_cpu_input("lane_rows", np.asarray(offsets, np.int64))
        b.bind_cpu_input("row_temperature", np.asarray(temps, np.float32)[None])
        self.session.run_with_iobinding(b)
        ids, probs, entropy = (v.numpy()[0] for v in b.get_outputs()[:len(_REDUCED)])
        outs = []
        for i, lane in enumerate(lanes):
            lane.kv.keep(np.arange(len(lane.tokens)))
            rows = slice(offsets[i], offsets[i + 1])
            outs.append(LaneOutput(ids[rows], probs[rows], entropy[rows]))
        return outs
