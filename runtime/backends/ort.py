"""ONNX Runtime backend: one InferenceSession per graph, I/O binding onto preallocated buffers.

    with OrtBackend("artifacts/smollm2", Manifest.read("artifacts/smollm2"), threads=2) as backend:
        with backend.new_session() as session:
            out = session.run(ids, positions, tree_mask, medusa=True, temperature=1.0)

Either KV layout of the manifest (``io_table.KV_LAYOUTS``), bound onto preallocated buffers so that a step
copies nothing in proportion to the context: sequence-major (portable graphs), the committed prefix
``[:, :past]`` is bound as ``past_key_values.*`` and ``present.*`` onto ``[:, past:past+T]``; head-major shared
(fused graphs), each whole buffer is bound as both, and GroupQueryAttention writes the new rows in place. A
fused Medusa graph verifies a tree per root-to-leaf path (runtime/tree_paths.py: bit-identical to plain
decoding): the session keeps one KV slot per path (`SlotCache`), binds them as the graph's head groups, and
commits the accepted path's rows from its slot. Each graph's inputs and outputs are checked against the I/O
table when it is loaded.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from .. import io_table, kernels
from ..errors import ArtifactError, BackendUnavailableError, InputError
from ..artifact_files import MANIFEST, artifact_file, check_external_data, check_file, graph_io_names
from ..manifest import ONNXRUNTIME, Manifest
from ..tree_paths import PathBatch
from .base import Backend, KVCache, MaskBuffer, ModelDims, Session, StepOutput, runtime_closed
from .ort_errors import reason, run_bound
from .ort_lanes import OrtLanes
from .ort_outputs import first_outputs, selects_rows, unbind_outputs
from .slot_cache import SlotCache


def _manifest_bytes(directory) -> bytes | None:
    try:
        return (Path(directory) / MANIFEST).read_bytes()
    except OSError:
        return None


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        if isinstance(e.__context__, KeyboardInterrupt):  # its native start-up turns a Ctrl-C into ImportError
            raise KeyboardInterrupt from None
        if isinstance(e, ModuleNotFoundError) and e.name == "onnxruntime":
            raise BackendUnavailableError("onnxruntime is not installed: pip install 'medusa-export[ort]'") from None
        why = " ".join(str(e).split())[:160]
        raise BackendUnavailableError(f"onnxruntime is installed but cannot be imported ({why}): reinstall the "
                                      f"ONNX Runtime package this environment uses (onnxruntime, or "
                                      f"onnxruntime-gpu)") from None
    return ort


# GroupQueryAttention with position_ids and attention_bias (a tree mask) on CPU: ONNX Runtime 1.22 and later.
MIN_FUSED_VERSION = (1, 22)
MAX_THREADS = 4096  # ONNX Runtime's pybind layer takes a C int; larger counts failed there as a TypeError


def check_fused_support(version: str) -> None:
    """BackendUnavailableError when this ONNX Runtime cannot run the fused graph's operators."""
    try:
        have = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return  # a development build: let loading tell
    if have < MIN_FUSED_VERSION:
        need = ".".join(map(str, MIN_FUSED_VERSION))
        raise BackendUnavailableError(f"the fused ONNX Runtime graph needs onnxruntime >= {need} (this is {version}): "
                                      f"pip install -U 'onnxruntime>={need}', or build with --graph portable")


def _ort_type(dtype: np.dtype) -> str:
    """ONNX Runtime's name of a tensor type (``NodeArg.type``): numpy's name, but float32 is ``float``."""
    return "tensor(float)" if dtype == np.float32 else f"tensor({dtype.name})"


def check_graph_io(session, path: Path, dims: ModelDims, medusa: bool, layout: str = io_table.SEQUENCE_MAJOR,
                   paths: int = 1, lanes: int = 0, attention: str = "gqa") -> None:
    """ArtifactError naming the first tensor whose name, type or fixed size differs from the I/O table."""
    actual = {"input": session.get_inputs(), "output": session.get_outputs()}
    tables = _io_tables(dims.num_layers, medusa, layout, paths, lanes, attention, {a.name for a in actual["input"]})
    for role, table in tables.items():
        found = {a.name: a for a in actual[role]}
        _check_io_names(path, role, table, found)
        for t in table:
            a = found[t.name]
            want = _ort_type(t.dtype_in(dims))
            if a.type != want:
                raise ArtifactError(f"{path.name}: {role} {t.name!r} is {a.type}, the I/O table says {want}: "
                                    f"rebuild the artifact")
            fixed = t.fixed_sizes(dims)
            if len(a.shape) != len(t.axes) or any(a.shape[i] != size for i, size in fixed.items()):
                raise ArtifactError(f"{path.name}: {role} {t.name!r} has shape {list(a.shape)}, the I/O table and "
                                    f"manifest say {list(t.axes)} = {[fixed.get(i, ax) for i, ax in enumerate(t.axes)]}: "
                                    f"rebuild the artifact")


def check_graph_io_names(path: Path, dims: ModelDims, medusa: bool, layout: str = io_table.SEQUENCE_MAJOR,
                         paths: int = 1, lanes: int = 0, attention: str = "gqa") -> None:
    """`check_graph_io`'s names, read from the graph file without a session: a graph opened only at its first use
    (the lanes graph: a server's first batched step, `bench --concurrency` after its single-stream rows) is refused
    at load if it is another graph, or built for other lanes."""
    inputs, outputs = graph_io_names(path)
    tables = _io_tables(dims.num_layers, medusa, layout, paths, lanes, attention, set(inputs))
    for role, names in (("input", inputs), ("output", outputs)):
        _check_io_names(path, role, tables[role], set(names))


def _io_tables(n: int, medusa: bool, layout: str, paths: int, lanes: int, attention: str, inputs: set[str]) -> dict:
    """The I/O table's inputs and outputs of a graph, with the optional inputs among ``inputs`` (the graph's)."""
    gathers = attention != "kernel"
    tables = ((io_table.lanes_inputs(n, lanes, gathers), io_table.lanes_outputs(n, lanes)) if lanes else
              (io_table.inputs(n, layout, paths), io_table.outputs(n, medusa, layout, paths)))
    optional = [io_table.row_selection_input()]  # newer fused graphs; older ones lack it
    if lanes and not gathers:  # kernel lanes graphs built before LanesAttention gather rows per lane
        optional += [t for t in io_table.lanes_inputs(n, lanes) if t.name in ("lane_gather", "row_gather")]
    return {"input": tables[0] + [t for t in optional if t.name in inputs], "output": tables[1]}


def _check_io_names(path: Path, role: str, table: list, found) -> None:
    """ArtifactError for a name of ``found`` (a graph's inputs or outputs) not in ``table``, or one missing."""
    extra = sorted(set(found) - {t.name for t in table})
    if extra:
        raise ArtifactError(f"{path.name} has an unexpected {role} {extra[0]!r}: it was not built by this "
                            f"medusa-export, rebuild the artifact")
    missing = next((t.name for t in table if t.name not in found), None)
    if missing is not None:
        raise ArtifactError(f"{path.name} lacks the {role} {missing!r}: rebuild the artifact")


def _min_rows(manifest: Manifest) -> int:
    """Rows every quantized matmul of the lanes graph must see (`exporter/quantize.RECIPES`); 1 for float weights."""
    q = manifest.graphs["lanes"].quantization if "lanes" in manifest.graphs else None
    return q.min_rows if q is not None else 1


class OrtBackend(Backend):
    name = "ort"

    def __init__(self, directory: str | Path, manifest: Manifest, *, threads: int | None = None,
                 device: str = "cpu", max_seq: int | None = None, first_graph: str | None = None) -> None:
        """``first_graph``: the graph opened at load ("medusa" | "vanilla"; default: the one a request with the
        artifact's defaults runs)."""
        ort = _import_ort()
        self.dims = dims = manifest.dims
        self.max_seq = min(max_seq or manifest.max_seq, manifest.max_seq)
        self.kv_layout = manifest.kv_layout
        # Per graph: root-to-leaf paths it verifies exactly, one head group each (1: a masked tree step).
        self.paths = {kind: graph.paths for kind, graph in manifest.graphs.items()}
        self.max_paths = self.paths["medusa"] if manifest.graph_format == ONNXRUNTIME and dims.num_heads else None
        # Fused graphs compute each row as a one-token step does (tree nodes per path, lanes, prompt chunks); a
        # portable graph's masked tree step does not, in the last bits. That rests on ONNX Runtime computing every row
        # independently of how many go in together, which build checks only where it builds a lanes graph
        # (`exporter/build._check_lanes`, prompt-sized runs beside one-row steps; a --max-num-seqs 1 build is what its
        # failure advises): without one, a prompt's rows never had to equal step rows, so they are not reused.
        self.reuses_rows = manifest.graph_format == ONNXRUNTIME and "lanes" in manifest.graphs
        if manifest.graph_format == ONNXRUNTIME:
            check_fused_support(ort.__version__)
        if device != "cpu":
            # The KV buffers are numpy arrays bound in host memory: on a GPU every step would copy the whole context
            # both ways. Rather than run that slowly, refuse it.
            raise BackendUnavailableError(f"--device {device} is not supported by the ONNX Runtime backend (its KV "
                                          f"cache lives in host memory): use --backend trt or --backend torch on a GPU")
        providers = ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 4  # fatal only: its errors reach the user as our one-line errors instead
        # A memory pattern is planned and kept for every distinct set of input shapes, and a step's shapes change with
        # its past: a server's patterns grew by ~25 MiB over 16 rounds of load, for no measured speed (level within
        # 2 %, alone and batched, fp32 and int8: docs/serving.md, "Memory under load").
        opts.enable_mem_pattern = False
        if threads is not None and not (isinstance(threads, int) and not isinstance(threads, bool)
                                        and 1 <= threads <= MAX_THREADS):
            raise InputError(f"threads must be an integer in 1..{MAX_THREADS}, got {threads!r:.40}")
        if threads:
            opts.intra_op_num_threads = threads
        kernels.register(opts, manifest.attention)  # graphs built with --attention kernel: compiled at first use
        self.directory, self.manifest, self.opts, self.providers = directory, manifest, opts, providers
        self.loaded_manifest = _manifest_bytes(directory)  # what a graph opened later must still belong to
        # Each open graph holds its own prepacked weights (~0.6 GB for the default fp32 model), so graphs open at
        # their first use: the one a request with the artifact's defaults runs at load (a damaged one fails there),
        # the other one-sequence graph and the lanes graph (batched steps) when a request or the engine needs them.
        self.sessions: dict = {}
        self.selects_rows: dict[str, bool] = {}  # per open graph: computes outputs for the rows asked only
        self._lanes: OrtLanes | None = None
        self._lock = threading.Lock()
        self._closed = False
        first = first_graph or ("medusa" if dims.num_heads else "vanilla")
        if first not in ("medusa", "vanilla") or first not in manifest.graphs:
            raise InputError(f"first_graph {first!r}: choose one of this artifact's one-sequence graphs "
                             f"({', '.join(k for k in ('medusa', 'vanilla') if k in manifest.graphs)})")
        self.graph(first)  # its files checked as it opens
        for kind in manifest.graphs:  # the others' files and I/O names now, their sessions at their first use
            if kind != first:
                check_graph_io_names(self._check_files(kind), dims, **self._io_spec(kind))

    def _open(self, kind: str):
        """An ONNX Runtime session of the manifest's graph ``kind``, its inputs and outputs checked."""
        ort = _import_ort()
        path = self._check_files(kind)
        try:
            session = ort.InferenceSession(str(path), self.opts, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise ArtifactError(f"ONNX Runtime cannot load {path} ({reason(e)}): rebuild the artifact") from None
        check_graph_io(session, path, self.dims, **self._io_spec(kind))
        return session

    def _io_spec(self, kind: str) -> dict:
        """What graph ``kind``'s I/O table depends on (`check_graph_io`, `check_graph_io_names`)."""
        return {"medusa": kind == "medusa", "layout": self.kv_layout, "paths": self.paths[kind],
                "lanes": self.manifest.graphs[kind].lanes, "attention": self.manifest.attention}

    def _check_files(self, kind: str) -> Path:
        """Graph ``kind``'s file and every file it reads weights from: listed in the manifest, of their recorded
        sizes, in the artifact loaded (not one rebuilt since). Its path."""
        graph, directory = self.manifest.graphs[kind], self.directory
        path = artifact_file(directory, graph.file)
        if _manifest_bytes(directory) != self.loaded_manifest:  # a graph opened after load: the same artifact?
            raise ArtifactError(f"{directory} changed on disk after it was loaded (rebuilt or replaced): load it again")
        # Build keeps weights past 2 GB in `<file>.data` and lists it; one there but not listed is refused.
        self.manifest.listed_file(directory, graph.file + ".data")
        check_external_data(directory, graph.file, self.manifest.files)
        check_file(path, self.manifest.files[graph.file], check_hashes=False)
        return path

    def graph(self, kind: str):
        """The session of one-sequence graph ``kind`` ("medusa" | "vanilla"), opened at its first use."""
        with self._lock:
            if self._closed:
                raise runtime_closed()
            if kind not in self.sessions:
                session = self._open(kind)
                self.selects_rows[kind] = selects_rows(session)
                self.sessions[kind] = session
            return self.sessions[kind]

    @property
    def lanes(self) -> OrtLanes | None:
        """The batched steps' runner on the lanes graph (None without one), opened at the first call."""
        with self._lock:
            if self._lanes is None and not self._closed and "lanes" in self.manifest.graphs:
                self._lanes = OrtLanes(self._open("lanes"), self.dims, self.manifest.lanes, _min_rows(self.manifest))
            return self._lanes

    def new_session(self, capacity: int | None = None) -> Session:
        if self._closed:
            raise runtime_closed()
        return OrtSession(self, min(capacity or self.max_seq, self.max_seq))

    def close(self) -> None:
        with self._lock:  # ONNX Runtime frees a session's memory when its last reference goes
            self.sessions, self._lanes, self._closed = {}, None, True


class OrtSession(Session):
    def __init__(self, backend: OrtBackend, capacity: int) -> None:
        self.backend = backend
        self.capacity = capacity
        # Shared layout: past and present are the same whole buffers, bound as both input and output below; the
        # fused graph writes one row more than the step's T (see exporter/fused_backbone.py), hence the spare row.
        shared = backend.kv_layout == io_table.HEAD_MAJOR_SHARED
        self.kv = SlotCache(backend.dims, capacity + 1) if shared else KVCache(backend.dims, capacity)
        self.batch: PathBatch | None = None  # the last run's paths, when its graph verifies per path
        self._batches: dict[tuple, PathBatch] = {}
        self.masks = MaskBuffer()
        self.bindings: dict = {}  # per graph, made at this session's first step on it (`_binding`)
        self.graphs: dict = {}
        self.reduced: dict[str, list[str]] = {}
        n = backend.dims.num_layers
        self.past_names = io_table.kv_names(n, "past_key_values")
        self.present_names = io_table.kv_names(n, "present")
        self.kv_bound: dict[str, tuple] = {}  # per graph, the KV memory its binding holds
        self.temperature = np.ones(1, np.float32)
        self.elem = backend.dims.cache_np  # the KV buffers'

    @property
    def length(self) -> int:
        return self.kv.length if self.kv is not None else 0

    @property
    def kv_bytes(self) -> int:
        return self.kv.nbytes if self.kv is not None else 0

    def run(self, input_ids, position_ids, tree_mask, medusa, temperature, out_rows=None) -> StepOutput:
        if self.kv is None:
            raise ValueError("this session is closed")
        if self.backend._closed:  # a stream still running when its runtime closed: it ends here, and frees the graphs
            self.close()
            raise runtime_closed(while_running=True)
        kind = "medusa" if medusa else "vanilla"
        b = self._binding(kind)
        t = len(input_ids)
        if self.backend.selects_rows.get(kind):
            b.bind_cpu_input("output_rows", np.arange(t, dtype=np.int64) if out_rows is None else
                             np.ascontiguousarray(out_rows, np.int64))
        # Inputs are rebound every step (a rebind replaces); the KV buffers only when their memory changed: binding
        # 4 x layers tensors costs more host time than the rest of the step's Python.
        b.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, np.int64).reshape(1, t))
        b.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, np.int64).reshape(1, t))
        paths = self.backend.paths.get(kind) or 1
        self.batch = self._path_batch(tree_mask, paths) if paths > 1 else None
        if self.batch is not None:  # attention rows are depths, one head group per path, causal in each
            b.bind_cpu_input("path_rows", self.batch.path_rows)
            b.bind_cpu_input("node_rows", self.batch.node_rows)
            tree_mask = np.tri(self.batch.path_rows.shape[0], dtype=bool)
        b.bind_cpu_input("attention_mask", self.masks.build(self.kv.length, tree_mask))
        self.temperature[0] = temperature
        b.bind_cpu_input("temperature", self.temperature)
        if isinstance(self.kv, SlotCache):  # shared: past and present are the same whole buffers
            self.kv.prepare(len(tree_mask), paths)
            key = (paths, id(self.kv.store), self.kv.store.ctypes.data)
            if self.kv_bound.get(kind) != key:
                views = self.kv.buffers(paths)
                self._bind_kv(b, views, views)
                self.kv_bound[kind] = key
        else:  # sequence-major: the past view grows every step
            present = self.kv.stage(t)
            self._bind_kv(b, self.kv.past(), present)
        reduced = self.reduced[kind]
        unbind_outputs(b, reduced)  # small ([T, S], [T, T], ...): let ORT allocate them (shapes change with T)
        run_bound(self.graphs[kind], b, f"{kind} graph")
        return StepOutput.from_named({name: v[0] for name, v in zip(reduced, first_outputs(b, len(reduced)))})

    def _binding(self, kind: str):
        """This session's I/O binding on graph ``kind`` (the graph opened if no session has run it yet)."""
        b = self.bindings.get(kind)
        if b is None:
            graph = self.backend.graph(kind)
            b = self.bindings[kind] = graph.io_binding()
            self.graphs[kind], self.reduced[kind] = graph, io_table.reduced_names(kind == "medusa")
            for name in self.reduced[kind]:  # first: get_outputs() follows the order of first binding
                b.bind_output(name, "cpu")
        return b

    def _bind_kv(self, b, past: list[np.ndarray], present: list[np.ndarray]) -> None:
        for name, view in zip(self.past_names, past):
            self._bind(b.bind_input, name, view)
        for name, view in zip(self.present_names, present):
            self._bind(b.bind_output, name, view)

    def _path_batch(self, tree_mask: np.ndarray, paths: int) -> PathBatch:
        key = (tree_mask.shape, np.packbits(tree_mask).tobytes(), paths)
        if key not in self._batches:  # one tree per generation: derive its paths once
            self._batches[key] = PathBatch.from_mask(tree_mask, paths)
        return self._batches[key]

    def _bind(self, bind, name: str, view: np.ndarray) -> None:
        # The views are contiguous slices of the preallocated buffers (either layout).
        bind(name, "cpu", 0, self.elem, list(view.shape), view.ctypes.data)

    def keep(self, rows) -> None:
        if self.batch is None:
            self.kv.keep(rows)
        else:  # the accepted nodes are the first rows of a path, in that path's slot
            self.kv.keep(np.arange(len(rows)), slot=self.batch.path_of(rows))
            self.batch = None

    def reset(self) -> None:
        self._live_kv().reset()
        self.batch = None

    def rewind(self, length: int) -> None:
        self._live_kv().rewind(length)
        self.batch = None

    def copy_rows(self, other: Session, length: int) -> None:
        self._live_kv().copy_rows(other._live_kv(), length)
        self.batch = None

    def _live_kv(self) -> KVCache | SlotCache:
        if self.kv is None:
            raise ValueError("this session is closed")
        return self.kv

    def close(self) -> None:
        self.bindings, self.graphs, self.kv = {}, {}, None
