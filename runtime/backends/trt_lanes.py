"""Batched steps on TensorRT: several sequences in one execution of the vanilla engine's batch profile.

    backend = TrtBackend(...)                 # engines built with `--max-num-seqs N` (N > 1)
    outs = backend.lanes.run([Lane(session_a, tokens_a, 1.0), None, Lane(session_b, tokens_b, 1.0)])
    backend.lanes.keep(session_a, np.arange(n))

The same contract as the ONNX Runtime lanes graph (`lanes.py`), on the portable graph's batch dimension. Per step:

* the lanes' rows are padded to one ``[B, T]`` block (T: the most rows of a lane; padded rows' results are dropped);
* each lane's committed KV prefix is copied from its session's buffers into a ``[B, P, kv_heads, head_dim]`` batch
  tensor per layer (P: the longest prefix; one 2-D device copy per lane covers every layer) and the rows past a
  lane's own prefix are masked out;
* the new rows come back as ``present`` ``[B, T, ...]`` in a staging buffer, and each lane's own rows go to its
  session's KV at its length (one 2-D copy per lane), staged there as a one-sequence run stages them, so
  `TrtSession.keep` commits them;
* lanes with different temperatures run as separate executions (the graph takes one temperature); lanes with more
  rows than the profile's T run in causal chunks.

A padded batch changes each sequence's summation order in attention (its keys sit in a longer, masked window) and
the kernels TensorRT picks per shape, so a batched sequence's numbers may differ in the last bits from the same
sequence alone: the batch invariance the ONNX Runtime lanes graph guarantees is not claimed here. Not run on a GPU
yet (tested against the stand-ins of `tests/fake_trt.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import io_table
from ..errors import EngineError
from . import cuda_buffers, trt_compat as compat
from .lanes import Lane, LaneOutput

_OUTPUTS = ("next_token_ids", "next_token_probs", "entropy")  # what a lane's output holds


MIN_PAST_ROWS = 256  # the batch past's first size in rows per lane; it doubles as longer prefixes arrive


@dataclass
class _Device:
    stream: object
    ctx: object
    inputs: cuda_buffers.DeviceArena  # token inputs and reduced outputs, one piece each
    ptr: dict[str, int]
    stage: cuda_buffers.DeviceArena  # every layer's [B, T, kv_heads, head_dim] present rows
    past: cuda_buffers.DeviceArena | None = None  # every layer's [B, P, kv_heads, head_dim] batch past
    past_rows: int = 0  # the longest prefix per lane it has room for


class TrtLanes:
    def __init__(self, backend, engine, profile: int) -> None:
        p = engine.profiles[profile]
        self.backend, self.engine, self.profile = backend, engine, profile
        self.lanes, self.max_rows, self.max_past = p.batch[2], p.seq[2], p.past[2]
        d = backend.dims
        self.row = d.num_kv_heads * d.head_dim * backend.elem_bytes
        self.layers = 2 * d.num_layers
        self.past_names = io_table.kv_names(d.num_layers, "past_key_values")
        self.present_names = io_table.kv_names(d.num_layers, "present")
        self.device: _Device | None = None  # allocated at the first step

    # ---- the contract -----------------------------------------------------------------------------------
    def run(self, lanes: list[Lane | None]) -> list[LaneOutput | None]:
        if len(lanes) > self.lanes or not any(lanes):
            raise ValueError(f"a batched step takes 1 to {self.lanes} sequences")
        for i, lane in enumerate(lanes):
            if lane and not lane.session._release.alive:
                raise ValueError(f"lane {i}: its session is closed")
            if lane and lane.session.length + len(lane.tokens) > lane.session.capacity:
                raise ValueError(f"lane {i}: {lane.session.length} + {len(lane.tokens)} rows do not fit a KV buffer "
                                 f"of {lane.session.capacity}")
        by_temperature: dict[float, list[Lane]] = {}
        for lane in lanes:
            if lane:
                by_temperature.setdefault(float(lane.temperature), []).append(lane)
        rows: dict[int, list[tuple]] = {id(lane): [] for lane in lanes if lane}
        b = self.backend
        b.use_device()
        with b.lock:
            dev = self._device()
            for lane in (x for x in lanes if x):  # their sessions' own copies (keep) come first
                b.cuda.synchronize(lane.session.stream)
            for temperature, group in by_temperature.items():
                for start in range(0, max(len(x.tokens) for x in group), self.max_rows):
                    chunk = [x for x in group if len(x.tokens) > start]
                    for lane, out in zip(chunk, self._execute(dev, chunk, start, temperature)):
                        rows[id(lane)].append(out)
        outs: list[LaneOutput | None] = []
        for lane in lanes:
            if lane is None:
                outs.append(None)
                continue
            lane.session.stage_rows(len(lane.tokens))
            ids, probs, entropy = (np.concatenate(parts) for parts in zip(*rows[id(lane)]))
            first = lane.first_output()
            outs.append(LaneOutput(ids[first:].astype(np.int64), probs[first:].astype(np.float32),
                                   entropy[first:].astype(np.float32)))
        return outs

    def keep(self, session, rows: np.ndarray) -> None:
        session.keep(rows)

    @property
    def kv_bytes(self) -> int:
        """Device bytes the batch past holds now (it grows with the longest prefix, up to lanes x max_seq rows)."""
        return self.device.past.nbytes if self.device is not None and self.device.past is not None else 0

    def close(self) -> None:
        dev, self.device = self.device, None
        if dev is not None:
            _free(self.backend.cuda, dev.stream, dev.inputs, dev.stage, dev.past)

    # ---- one execution ------------------------------------------------------------------------------------
    def _execute(self, dev: _Device, lanes: list[Lane], start: int, temperature: float) -> list[tuple]:
        """Rows ``[start, start + max_rows)`` of each lane (all have some) in one execution; per lane its rows'
        (ids, probs, entropy)."""
        b, e, cuda, stream = self.backend, self.engine, self.backend.cuda, dev.stream
        pasts = [lane.session.length + start for lane in lanes]
        tokens = [lane.tokens[start:start + self.max_rows] for lane in lanes]
        n, t, p = len(lanes), max(len(x) for x in tokens), max(pasts)
        if p > self.max_past:
            raise ValueError(f"a batched step after {p} tokens exceeds the batch profile's past ({self.max_past})")
        past_base = self._past(dev, p)
        ids = np.zeros((n, t), e.dtypes["input_ids"])
        pos = np.zeros((n, t), e.dtypes["position_ids"])
        mask = np.zeros((n, 1, t, p + t), bool)
        for i, (row_ids, past) in enumerate(zip(tokens, pasts)):
            k = len(row_ids)
            ids[i, :k] = row_ids
            pos[i] = past + np.minimum(np.arange(t), k - 1)
            mask[i, 0, :, :past] = True
            mask[i, 0, :, p:] = np.tri(t, dtype=bool)  # padded rows too: their outputs and KV rows are dropped
        past_pitch = cuda_buffers.round_up(n * p * self.row)
        for i, (lane, past) in enumerate(zip(lanes, pasts)):  # each lane's prefix into the batch past, all layers
            if past:
                s = lane.session
                cuda.d2d_2d(past_base + i * p * self.row, past_pitch, s.kv, s.pitch, past * self.row,
                            self.layers, stream)
        try:
            return self._enqueue(dev, lanes, tokens, pasts, n, t, p, past_base, ids, pos, mask, temperature)
        except BaseException:
            cuda.synchronize(stream)  # the copies already queued read host arrays and buffers the caller may drop
            raise

    def _enqueue(self, dev: _Device, lanes, tokens, pasts, n, t, p, past_base, ids, pos, mask, temperature):
        b, e, cuda, stream = self.backend, self.engine, self.backend.cuda, dev.stream
        past_pitch = cuda_buffers.round_up(n * p * self.row)
        stage_pitch = cuda_buffers.round_up(n * t * self.row)
        ctx = dev.ctx
        # Host sources stay referenced here until the synchronize below (cudaMemcpyAsync from pageable memory may
        # read them late).
        host = {"input_ids": ids, "position_ids": pos, "attention_mask": mask.astype(e.dtypes["attention_mask"]),
                "temperature": np.full(1, temperature, e.dtypes["temperature"])}
        for name, arr in host.items():
            cuda.h2d(dev.ptr[name], arr, stream)
            if name != "temperature":  # static [1]
                self._shape(name, arr.shape)
            compat.bind_address(ctx, name, dev.ptr[name])
        kv_shape = (n, p, *self._kv_dims())
        for j, name in enumerate(self.past_names):
            self._shape(name, kv_shape)
            compat.bind_address(ctx, name, past_base + j * past_pitch)
        for j, name in enumerate(self.present_names):
            compat.bind_address(ctx, name, dev.stage.base + j * stage_pitch)
        for x in e.reduced:
            compat.bind_address(ctx, x.name, dev.ptr[x.name])
        if not ctx.execute_async_v3(cuda.handle(stream)):
            cuda.synchronize(stream)  # the gathers already queued finish before the caller frees anything
            raise EngineError(f"TensorRT execution failed (vanilla engine, batched step of {n} x {t} rows after up to "
                              f"{p}): see the TensorRT log above; check the GPU with nvidia-smi")
        for i, (lane, past, row_ids) in enumerate(zip(lanes, pasts, tokens)):  # each lane's new rows into its session
            s = lane.session
            cuda.d2d_2d(s.kv + past * self.row, s.pitch, dev.stage.base + i * t * self.row, stage_pitch,
                        len(row_ids) * self.row, self.layers, stream)
        host_out = {name: np.empty((n, t) + (() if name == "entropy" else (b.dims.sample_topk,)), e.dtypes[name])
                    for name in _OUTPUTS}
        for name, arr in host_out.items():
            cuda.d2h(arr, dev.ptr[name], stream)
        cuda.synchronize(stream)
        return [tuple(host_out[name][i, :len(x)] for name in _OUTPUTS) for i, x in enumerate(tokens)]

    def _shape(self, name: str, shape: tuple) -> None:
        if not self.device.ctx.set_input_shape(name, shape):
            self.backend.cuda.synchronize(self.device.stream)
            raise EngineError(f"TensorRT rejected shape {shape} for {name} (batch profile): rebuild the engines "
                              f"(`medusa-export build-engines ARTIFACT --max-num-seqs {self.lanes}`)")

    def _kv_dims(self) -> tuple[int, int]:
        d = self.backend.dims
        return d.num_kv_heads, d.head_dim

    def _device(self) -> _Device:
        """The execution context on the batch profile, its stream and buffers (made once)."""
        if self.device is not None:
            return self.device
        b, e, cuda = self.backend, self.engine, self.backend.cuda
        ctx = e.engine.create_execution_context()
        if ctx is None:
            raise EngineError("TensorRT could not create an execution context for batched steps: the GPU is probably "
                              "out of memory; free it, or use a smaller --max-seq or --max-num-seqs")
        stream, arenas = cuda.stream_create(), []
        try:
            if not compat.switch_profile(ctx, self.profile, cuda.handle(stream)):
                raise EngineError(f"TensorRT could not switch a context to the batch profile ({self.profile}): "
                                  f"rebuild the engines")
            largest = {io_table.BATCH: self.lanes, io_table.SEQ: self.max_rows,
                       io_table.TOTAL: self.max_past + self.max_rows}
            sizes = {t.name: int(np.prod(t.shape(b.dims, largest))) * e.dtypes[t.name].itemsize
                     for t in io_table.token_inputs() + e.reduced}
            arenas.append(cuda_buffers.DeviceArena(cuda, list(sizes.values())))
            arenas.append(cuda_buffers.DeviceArena(
                cuda, [self.layers * cuda_buffers.round_up(self.lanes * self.max_rows * self.row)]))
        except BaseException:
            _free(cuda, stream, *arenas)
            raise
        self.device = _Device(stream, ctx, arenas[0], dict(zip(sizes, arenas[0].ptrs)), arenas[1])
        return self.device

    def _past(self, dev: _Device, rows: int) -> int:
        """The batch past's base address, with room for ``rows`` per lane: it starts at `MIN_PAST_ROWS` and doubles
        (up to the profile's past) as longer prefixes arrive, rather than holding lanes x max_seq rows from the
        start (a second copy of every lane's whole KV capacity)."""
        if rows > dev.past_rows or dev.past is None:
            need = min(max(MIN_PAST_ROWS, 2 * dev.past_rows, rows), self.max_past)
            cuda = self.backend.cuda
            cuda.synchronize(dev.stream)  # the old buffer may still be read by the last execution
            if dev.past is not None:
                dev.past.free()
                dev.past, dev.past_rows = None, 0
            dev.past = cuda_buffers.DeviceArena(cuda, [self.layers * cuda_buffers.round_up(self.lanes * need * self.row)])
            # Rows past a lane's own prefix are masked, but a masked key's value still meets a zero weight: they
            # must hold numbers (earlier prefixes or zeros), never uninitialised NaNs.
            cuda.memset(dev.past.base, 0, dev.past.nbytes, dev.stream)
            dev.past_rows = need
        return dev.past.base


def _free(cuda, stream, *arenas) -> None:
    for arena in arenas:
        if arena is not None:
            arena.free()
    try:
        cuda.stream_destroy(stream)
    except Exception:  # interpreter shutdown or a dead context
        pass
