"""TensorRT backend: the artifact's serialized engines, device-resident KV cache, one execution context per session.

    backend = TrtBackend("artifacts/gpu", manifest, dims)      # after `medusa-export build --engine trt`
    session = backend.new_session()

Mirrors the ONNX Runtime backend. The engines are checked against this machine (TensorRT version, GPU compute
capability: `trt_compat.py`) and deserialised once per backend. Each session owns a CUDA stream, its
execution contexts (contexts are not thread-safe) and one device allocation holding every layer's KV buffer,
sequence-major ``[capacity, kv_heads, head_dim]``, so:

* the committed prefix of a layer is contiguous: ``past_key_values.*`` is bound at the layer's base address
  with shape ``[1, past, kv_heads, head_dim]``, no copy;
* ``present.*`` (the T new rows) is bound at ``base + past * row_bytes`` so the rows land in place. TensorRT
  wants 256-byte aligned tensor addresses; when a row is not a multiple of 256 bytes the rows go to an
  aligned staging buffer and one 2-D device copy (all layers at once) puts them at ``past``;
* `keep(rows)` compacts accepted rows with device-to-device copies, one ``cudaMemcpy2DAsync`` per run of
  rows covering every layer (rows increase and ``rows[i] >= i``, so copying in order is safe).

Inputs go host -> device into preallocated buffers, the reduced outputs (top-k ids, probabilities, entropy,
head ids) come back, all on the session's stream, then one synchronize. Prompts longer than the prefill
profile run in causal chunks. No torch; TensorRT and cuda-python are imported only here, lazily.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import io_table
from ..errors import ArtifactError, EngineError, InputError
from ..artifact_files import artifact_file
from ..manifest import EngineRecord, Manifest
from . import cuda_buffers, trt_availability as availability, trt_compat as compat
from .trt_profiles import Profile, no_profile, step_runs
from .base import Backend, MaskBuffer, Session, StepOutput, runtime_closed
from .trt_lanes import TrtLanes

# TensorRT's tensor types as numpy reads them (engines may emit int32 ids where the graph has int64).
_NP_BY_TRT = {"INT64": np.int64, "INT32": np.int32, "FLOAT": np.float32, "HALF": np.float16, "BOOL": np.bool_,
              "INT8": np.int8, "UINT8": np.uint8}
POOL_SIZE = 4  # released sessions' device resources kept for reuse (a Generator opens one session per request)


def _np_dtype(dtype) -> np.dtype:
    name = getattr(dtype, "name", str(dtype)).split(".")[-1].upper()
    if name not in _NP_BY_TRT:
        raise ArtifactError(f"the TensorRT engine uses tensor type {name}, which this backend cannot read: rebuild the engine")
    return np.dtype(_NP_BY_TRT[name])


def _device_index(device: str | None) -> int:
    if device in (None, "", "cpu", "cuda", "gpu", "auto"):
        return 0  # the TensorRT backend always runs on a GPU; "cpu" is the CLI's default for other backends
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise InputError(f"--device {device!r}: the TensorRT backend takes cuda or cuda:N")


def row_moves(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """``(dst, src, count)`` copies (offsets after the committed prefix) that move staged rows ``rows`` to
    ``0..n-1``. Consecutive rows with the same shift are merged, at most ``shift`` rows at a time so that a
    copy's source and destination never overlap; in order, no copy overwrites a row still to be read."""
    moves, i, n = [], 0, len(rows)
    while i < n:
        shift = int(rows[i]) - i
        if shift == 0:
            i += 1
            continue
        j = i
        while j + 1 < n and int(rows[j + 1]) - (j + 1) == shift and j + 1 - i < shift:
            j += 1
        moves.append((i, int(rows[i]), j - i + 1))
        i = j + 1
    return moves


@dataclass
class _EngineInfo:
    kind: str
    engine: object
    profiles: list[Profile]
    dtypes: dict[str, np.dtype]  # every I/O tensor except the KV ones
    reduced: list[io_table.Tensor]  # the small outputs copied back
    max_t: int  # largest T and past + T of its one-sequence profiles
    max_total: int
    batch_profile: int | None = None  # index of its batch profile (the vanilla engine, built with --max-num-seqs > 1)


@dataclass
class _Context:
    ctx: object
    arena: cuda_buffers.DeviceArena
    ptr: dict[str, int]
    profile: int = 0


@dataclass
class _Resources:
    """A session's device state, returned to the backend's pool when the session is dropped."""
    capacity: int
    stream: object
    kv: cuda_buffers.DeviceArena
    contexts: dict[str, _Context] = field(default_factory=dict)


class TrtBackend(Backend):
    name = "trt"
    whole_tree_steps = True  # the Medusa engine's step profile has the tree's node count as its only T

    def __init__(self, directory: str | Path, manifest: Manifest, *, device: str | None = "cuda",
                 threads: int | None = None, max_seq: int | None = None) -> None:
        compat.require_portable(manifest, directory)  # before looking for TensorRT: this artifact can never run
        trt = availability.import_tensorrt()  # BackendUnavailableError: "TensorRT is not installed: pip install ..."
        self.cuda = cuda_buffers.load_cuda()  # BackendUnavailableError: "cuda-python is not installed: ..."
        index = _device_index(device)
        status = availability.require(index)  # BackendUnavailableError: "no CUDA device found: ..."
        self.cuda.set_device(index)
        self.device_index = index  # the CUDA device is per thread: sessions set it again when it is not 0
        self.trt, self.dims, self.directory = trt, manifest.dims, Path(directory)
        dims = self.dims
        self.max_seq = min(max_seq or manifest.max_seq, manifest.max_seq)
        records = manifest.engines
        needed = ["vanilla"] + (["medusa"] if dims.num_heads else [])
        missing = [k for k in needed if k not in records]
        if missing:
            raise ArtifactError(f"{directory} has no TensorRT engine for the {' and '.join(missing)} graph: "
                                f"{compat.rebuild_hint(directory)}")
        here = compat.Platform(trt.__version__, status.device.name, status.device.compute_capability)
        self.notes = tuple(w for k in needed if (w := compat.check(records[k], here, str(directory))))
        self.elem_bytes = io_table.model_dtype_of(dims.dtype).itemsize
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engines = {k: self._load(k, records[k]) for k in needed}
        self.alone_prefill_chunk = self.engines["vanilla"].max_t  # the prefill profile's largest T (max_prompt)
        self.scores_prompts = False  # `Backend.scores_prompts`
        batch = self.engines["vanilla"].batch_profile
        self.lanes = TrtLanes(self, self.engines["vanilla"], batch) if batch is not None else None
        self.lock = threading.Lock()  # one step on the GPU at a time: contexts of one engine share its profiles
        self._pool: list[_Resources] = []
        self._pool_lock = threading.Lock()
        self._closed = False

    def _load(self, kind: str, record: EngineRecord) -> _EngineInfo:
        path = artifact_file(self.directory, record.file)
        if not path.is_file():
            raise ArtifactError(f"TensorRT engine {path} is missing: {compat.rebuild_hint(self.directory)}")
        engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise ArtifactError(f"TensorRT cannot deserialize {path} (corrupt, or built by another TensorRT): "
                                f"{compat.rebuild_hint(self.directory)}")
        trt, n = self.trt, self.dims.num_layers
        medusa = kind == "medusa"
        compat.check_engine_io(trt, engine, path.name, io_table.input_names(n), io_table.output_names(n, medusa),
                               compat.rebuild_hint(self.directory))
        kv_dtype = _np_dtype(engine.get_tensor_dtype("past_key_values.0.key"))
        if kv_dtype != io_table.model_dtype_of(self.dims.dtype):
            raise ArtifactError(f"engine {path.name} has {kv_dtype.name} KV but the manifest says {self.dims.dtype}: "
                                f"{compat.rebuild_hint(self.directory)}")
        profiles = [Profile.from_record(p) for p in record.profiles]
        if engine.num_optimization_profiles != len(profiles):
            raise ArtifactError(f"engine {path.name} has {engine.num_optimization_profiles} optimization profiles, "
                                f"the manifest lists {len(profiles)}: {compat.rebuild_hint(self.directory)}")
        reduced = io_table.reduced_outputs(medusa)
        dtypes = {t.name: _np_dtype(engine.get_tensor_dtype(t.name)) for t in io_table.token_inputs() + reduced}
        single = [p for p in profiles if not p.batched]
        batch = next((i for i, p in enumerate(profiles) if p.batched), None)
        return _EngineInfo(kind, engine, profiles, dtypes, reduced, max(p.seq[2] for p in single),
                           max(p.total[2] for p in single), batch)

    # sessions -----------------------------------------------------------------------------------------
    def new_session(self, capacity: int | None = None) -> Session:
        if self._closed:  # its engines are gone: a session would allocate device memory, then fail untyped
            raise runtime_closed()
        return TrtSession(self, min(capacity or self.max_seq, self.max_seq))

    def use_device(self) -> None:
        if self.device_index:
            self.cuda.set_device(self.device_index)

    def _resources(self, capacity: int) -> _Resources:
        self.use_device()
        with self._pool_lock:
            for i, r in enumerate(self._pool):
                if r.capacity == capacity:
                    return self._pool.pop(i)
        d = self.dims
        row = d.num_kv_heads * d.head_dim * self.elem_bytes
        layers = 2 * d.num_layers
        max_t = max(e.max_t for e in self.engines.values())
        sizes = [layers * cuda_buffers.round_up(capacity * row)]
        if row % cuda_buffers.ALIGN:
            sizes.append(layers * cuda_buffers.round_up(max_t * row))
        stream = self.cuda.stream_create()
        return _Resources(capacity, stream, cuda_buffers.DeviceArena(self.cuda, sizes))

    def close(self) -> None:
        """Free the pooled device memory and streams and drop the engines (sessions must be closed first)."""
        with self._pool_lock:
            pool, self._pool = self._pool, []
            self._closed = True
        for res in pool:
            _destroy(self.cuda, res)
        if self.lanes is not None:
            self.lanes.close()
        self.engines, self.lanes = {}, None

    def _release(self, res: _Resources) -> None:
        with self._pool_lock:
            if len(self._pool) < POOL_SIZE and not self._closed:
                self._pool.append(res)
                return
        _destroy(self.cuda, res)

    def _context(self, res: _Resources, kind: str) -> _Context:
        c = res.contexts.get(kind)
        if c is None:
            e = self.engines[kind]
            ctx = e.engine.create_execution_context()
            if ctx is None:
                raise EngineError(f"TensorRT could not create an execution context for the {kind} engine: the GPU "
                                  f"is probably out of memory; free it or use a smaller --max-seq")
            largest = {io_table.BATCH: 1, io_table.SEQ: e.max_t, io_table.TOTAL: e.max_total}
            sizes = {t.name: int(np.prod(t.shape(self.dims, largest))) * e.dtypes[t.name].itemsize
                     for t in io_table.token_inputs() + e.reduced}
            arena = cuda_buffers.DeviceArena(self.cuda, list(sizes.values()))
            c = res.contexts[kind] = _Context(ctx, arena, dict(zip(sizes, arena.ptrs)))
        return c


def _destroy(cuda, res: _Resources) -> None:
    for c in res.contexts.values():
        c.arena.free()
    res.contexts.clear()
    res.kv.free()
    try:
        cuda.stream_destroy(res.stream)
    except Exception:  # interpreter shutdown or a dead context
        pass


class TrtSession(Session):
    def __init__(self, backend: TrtBackend, capacity: int) -> None:
        d = backend.dims
        self.backend = backend
        self.capacity = capacity
        self.res = backend._resources(capacity)
        self.cuda = backend.cuda
        self.stream = self.res.stream
        self.handle = self.cuda.handle(self.stream)
        self.layers = 2 * d.num_layers
        self.row = d.num_kv_heads * d.head_dim * backend.elem_bytes
        self.pitch = cuda_buffers.round_up(capacity * self.row)
        self.kv = self.res.kv.ptrs[0]
        self.in_place = self.row % cuda_buffers.ALIGN == 0
        self.stage = None if self.in_place else self.res.kv.ptrs[1]
        self.stage_pitch = cuda_buffers.round_up(max(e.max_t for e in backend.engines.values()) * self.row)
        self.past_names = io_table.kv_names(d.num_layers, "past_key_values")
        self.present_names = io_table.kv_names(d.num_layers, "present")
        self.masks = MaskBuffer()
        self.temperature = np.ones(1, np.float32)
        self._length = 0
        self.staged = 0
        # A safety net for sessions dropped without close(): the resources go back to the backend's pool.
        self._release = weakref.finalize(self, backend._release, self.res)

    @property
    def length(self) -> int:
        return self._length

    @property
    def kv_bytes(self) -> int:
        return self.layers * self.pitch

    def close(self) -> None:
        self._release()  # runs once; later calls do nothing

    def run(self, input_ids, position_ids, tree_mask, medusa, temperature, out_rows=None) -> StepOutput:
        # out_rows: every row is computed and returned (see `Session.run`)
        if not self._release.alive:
            raise ValueError("this session is closed")
        kind = "medusa" if medusa else "vanilla"
        b = self.backend
        if b._closed:  # a stream still running when its runtime closed (as on ONNX Runtime): it ends here
            self.close()
            raise runtime_closed(while_running=True)
        if kind not in b.engines:
            raise ValueError("this backend has no Medusa heads: run with medusa=False")
        e = b.engines[kind]
        t, past = len(input_ids), self._length
        if past + t > self.capacity:
            raise ValueError(f"{t} new tokens after {past} exceed the session's KV capacity {self.capacity}")
        tree_mask = np.asarray(tree_mask, bool)
        runs = step_runs(e.profiles, t, past, tree_mask)
        if runs is None and medusa:
            # Near the end of the KV capacity the heads' tree no longer fits and the Medusa engine's profiles take
            # only the tree's shape there: the step runs on the vanilla engine (same KV buffers), without heads.
            plain = b.engines["vanilla"]
            if (plain_runs := step_runs(plain.profiles, t, past, tree_mask)) is not None:
                kind, e, runs = "vanilla", plain, plain_runs
        if runs is None:
            no_profile(e.kind, e.profiles, t, past, tree_mask)
        step = {io_table.BATCH: 1, io_table.SEQ: t}
        out = {x.name: (np.zeros if x.name == "input_token_probs" else np.empty)(x.shape(b.dims, step)[1:],
                                                                                e.dtypes[x.name]) for x in e.reduced}
        ids = np.asarray(input_ids)
        pos = np.asarray(position_ids)
        self.temperature[0] = temperature
        blocks = []
        held: list = []  # the host sources of this step's copies (see `_enqueue`)
        b.use_device()
        with b.lock:
            c = b._context(self.res, kind)
            try:
                for a, z, p in runs:
                    blocks.append(self._enqueue(e, c, ids[a:z], pos[a:z], tree_mask, a, z, p, out, held))
            finally:  # also when a step fails half-way: nothing queued may outlive `held` or the buffers
                self.cuda.synchronize(self.stream)
        del held
        for a, z, block in blocks:
            if block is not None:  # chunked prefill: only each chunk's own block of input_token_probs exists
                out["input_token_probs"][a:z, a:z] = block
        self.staged = t
        return StepOutput.from_named(out)

    def _enqueue(self, e: _EngineInfo, c: _Context, ids, pos, tree_mask, a: int, z: int, profile: int,
                 out: dict, held: list):
        cuda, ctx, stream = self.cuda, c.ctx, self.stream
        d = self.backend.dims
        t = z - a
        past = self._length + a
        if c.profile != profile:
            if not compat.switch_profile(ctx, profile, self.handle):
                raise EngineError(f"TensorRT could not switch the {e.kind} context to profile {profile}: "
                                  f"{compat.rebuild_hint(self.backend.directory)}")
            c.profile = profile
        # A chunk of a causal prefill sees every earlier chunk: they are part of its past.
        mask = self.masks.build(past, tree_mask[a:z, a:z])
        # cudaMemcpyAsync from pageable host memory "might be synchronous" (CUDA runtime API, "API synchronization
        # behavior"), no more: the copy may read its source when the stream gets to it. So every host source stays
        # alive and unchanged until the caller synchronizes the stream (`held`), and the mask, built in a buffer the
        # next chunk reuses, is copied.
        host = {"input_ids": np.ascontiguousarray(ids, e.dtypes["input_ids"]).reshape(1, t),
                "position_ids": np.ascontiguousarray(pos, e.dtypes["position_ids"]).reshape(1, t),
                "attention_mask": np.array(mask, e.dtypes["attention_mask"], order="C"),
                "temperature": self.temperature.astype(e.dtypes["temperature"], copy=False)}
        held.append(host)
        for name, arr in host.items():
            cuda.h2d(c.ptr[name], arr, stream)
            if name != "temperature" and not ctx.set_input_shape(name, arr.shape):
                raise EngineError(f"TensorRT rejected shape {arr.shape} for {name} (profile {profile}): "
                                  f"{compat.rebuild_hint(self.backend.directory)}")
            compat.bind_address(ctx, name, c.ptr[name])
        kv_shape = (1, past, d.num_kv_heads, d.head_dim)
        for j, name in enumerate(self.past_names):
            if not ctx.set_input_shape(name, kv_shape):
                raise EngineError(f"TensorRT rejected shape {kv_shape} for {name} (profile {profile}): "
                                  f"{compat.rebuild_hint(self.backend.directory)}")
            compat.bind_address(ctx, name, self.kv + j * self.pitch)
        for j, name in enumerate(self.present_names):
            dst = self.kv + j * self.pitch + past * self.row if self.in_place else self.stage + j * self.stage_pitch
            compat.bind_address(ctx, name, dst)
        for x in e.reduced:
            compat.bind_address(ctx, x.name, c.ptr[x.name])
        if not ctx.execute_async_v3(self.handle):
            cuda.synchronize(stream)  # the copies already queued finish before the caller frees or reuses anything
            raise EngineError(f"TensorRT execution failed ({e.kind} engine, T={t}, past={past}, profile {profile}): "
                              f"see the TensorRT log above; check the GPU with nvidia-smi")
        if not self.in_place:  # staged rows -> [past, past+t) of every layer, one 2-D copy
            cuda.d2d_2d(self.kv + past * self.row, self.pitch, self.stage, self.stage_pitch, t * self.row,
                        self.layers, stream)
        block = None
        for name in (x.name for x in e.reduced):
            if name == "input_token_probs" and z - a < len(out[name]):  # one chunk of a causal prefill
                block = np.empty((t, t), e.dtypes[name])
                cuda.d2h(block, c.ptr[name], stream)
            else:
                cuda.d2h(out[name][a:z], c.ptr[name], stream)
        return a, z, block

    def stage_rows(self, t: int) -> None:
        """A batched step (`trt_lanes.py`) wrote ``t`` new rows at ``[length, length + t)``: `keep` commits them."""
        self.staged = t

    def keep(self, rows) -> None:
        rows = np.asarray(rows, np.int64)
        if rows.size and (rows.max() >= self.staged or rows.min() < 0 or np.any(np.diff(rows) <= 0)):
            raise ValueError(f"keep(rows={rows.tolist()}) needs increasing indices below {self.staged}")
        base = self.kv + self._length * self.row
        self.backend.use_device()
        for dst, src, count in row_moves(rows):
            self.cuda.d2d_2d(base + dst * self.row, self.pitch, base + src * self.row, self.pitch, count * self.row,
                             self.layers, self.stream)
        self._length += len(rows)
        self.staged = 0
