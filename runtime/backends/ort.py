"""ONNX Runtime backend: one InferenceSession per graph, I/O binding onto preallocated buffers.

The KV cache is sequence-major, so the committed prefix ``[:, :past]`` of each buffer is contiguous and is
bound as the ``past_key_values.*`` input without a copy, and ``present.*`` outputs are bound straight onto
``[:, past:past+T]`` of the same buffers: a step copies nothing in proportion to the context.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import io_table
from ..errors import ArtifactError, BackendUnavailableError
from .base import Backend, KVCache, MaskBuffer, ModelDims, Session, StepOutput

_NP = {"float32": np.float32, "float16": np.float16}


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailableError("onnxruntime is not installed: pip install 'medusa-export[ort]'") from None
    return ort


class OrtBackend(Backend):
    name = "ort"

    def __init__(self, directory: str | Path, manifest: dict, dims: ModelDims, *, threads: int | None = None,
                 device: str = "cpu", max_seq: int | None = None) -> None:
        ort = _import_ort()
        self.dims = dims
        self.max_seq = min(max_seq or manifest["max_seq"], manifest["max_seq"])
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailableError("--device cuda needs onnxruntime-gpu (pip install onnxruntime-gpu) and a CUDA GPU")
            providers.insert(0, "CUDAExecutionProvider")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        self.sessions = {}
        for kind, graph in manifest["graphs"].items():
            path = Path(directory) / graph["file"]
            try:
                self.sessions[kind] = ort.InferenceSession(str(path), opts, providers=providers)
            except Exception as e:  # onnxruntime raises its own exception types for bad files
                raise ArtifactError(f"ONNX Runtime cannot load {path} ({str(e).splitlines()[0][:160]}): rebuild the artifact") from None
        if dims.num_heads and "medusa" not in self.sessions:
            raise ArtifactError("the manifest lists Medusa heads but no medusa graph: rebuild the artifact")

    def new_session(self, capacity: int | None = None) -> Session:
        return OrtSession(self, min(capacity or self.max_seq, self.max_seq))


class OrtSession(Session):
    def __init__(self, backend: OrtBackend, capacity: int) -> None:
        self.backend = backend
        self.capacity = capacity
        self.kv = KVCache(backend.dims, capacity)
        self.masks = MaskBuffer()
        self.bindings = {k: s.io_binding() for k, s in backend.sessions.items()}
        n = backend.dims.num_layers
        self.past_names = io_table.kv_names(n, "past_key_values")
        self.present_names = io_table.kv_names(n, "present")
        self.temperature = np.ones(1, np.float32)
        self.elem = _NP[backend.dims.dtype]

    @property
    def length(self) -> int:
        return self.kv.length

    def run(self, input_ids, position_ids, tree_mask, medusa, temperature) -> StepOutput:
        kind = "medusa" if medusa else "vanilla"
        b = self.bindings[kind]
        t = len(input_ids)
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        b.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, np.int64).reshape(1, t))
        b.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, np.int64).reshape(1, t))
        b.bind_cpu_input("attention_mask", self.masks.build(self.kv.length, tree_mask))
        self.temperature[0] = temperature
        b.bind_cpu_input("temperature", self.temperature)
        for name, view in zip(self.past_names, self.kv.past()):
            self._bind(b.bind_input, name, view)
        reduced = io_table.output_names(self.backend.dims.num_layers, medusa)[: 5 if medusa else 4]
        for name in reduced:  # small ([T, S], [T, T], ...): let ORT allocate them
            b.bind_output(name, "cpu")
        for name, view in zip(self.present_names, self.kv.stage(t)):
            self._bind(b.bind_output, name, view)
        self.backend.sessions[kind].run_with_iobinding(b)
        outs = [o.numpy()[0] for o in b.get_outputs()[: len(reduced)]]
        return StepOutput(outs[0], outs[1], outs[2], outs[3], outs[4] if medusa else None)

    def _bind(self, bind, name: str, view: np.ndarray) -> None:
        # The views are contiguous slices of the preallocated buffers (sequence-major layout).
        bind(name, "cpu", 0, self.elem, list(view.shape), view.ctypes.data)

    def keep(self, rows) -> None:
        self.kv.keep(rows)
