"""Stand-ins for TensorRT used by tests/test_trt_backend.py (see its docstring); CUDA's is tests/fake_cuda.py."""

from __future__ import annotations

import enum
import json
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fake_cuda import FakeCuda


class _DT:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"DataType.{self.name}"


_ORT_TO_DT = {"tensor(int64)": "INT64", "tensor(float)": "FLOAT", "tensor(bool)": "BOOL", "tensor(float16)": "HALF"}
_DT_TO_NP = {"INT64": np.int64, "FLOAT": np.float32, "BOOL": np.bool_, "HALF": np.float16}


STRONGLY_TYPED = 1  # NetworkDefinitionCreationFlag.STRONGLY_TYPED in TensorRT 10 (0 in 11, where it is ignored)
# BuilderFlag values that enable reduced precision: TensorRT 10 refuses them on a strongly typed network, TensorRT 11
# removed them (the Python enum has no such members).
_WEAK_TYPING_FLAGS = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4")


class Severity(enum.IntEnum):  # trt.ILogger.Severity (an arithmetic pybind11 enum: int() gives these values)
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


def fake_tensorrt(cuda: FakeCuda, version: str = "10.3.0", align: int = 256, record: dict | None = None,
                  refuse_strongly_typed: bool = False, without_deprecated: bool = False, device: str = "sm_90"):
    """The slice of the TensorRT Python API the builder and the backend use, as TensorRT 10 or (``version`` "11...")
    TensorRT 11 expose it (tensorrt/python/src/infer/pyCore.cpp): on 11 ``STRONGLY_TYPED`` is 0 and ignored (every
    network is strongly typed) and ``BuilderFlag`` has no FP16 / BF16 / INT8 / FP8 members."""
    record = record if record is not None else {}
    major = int(version.split(".")[0])
    trt = types.SimpleNamespace(__version__=version)
    strongly_typed_bit = 0 if major >= 11 else STRONGLY_TYPED
    if major >= 11:
        # ``without_deprecated``: a later TensorRT that dropped the deprecated STRONGLY_TYPED member
        trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(
            PREFER_JIT_PYTHON_PLUGINS=1, PREFER_AOT_PYTHON_PLUGINS=2,
            **({} if without_deprecated else {"STRONGLY_TYPED": 0}))
        trt.BuilderFlag = types.SimpleNamespace(TF32="TF32")
    else:
        trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=STRONGLY_TYPED)
        trt.BuilderFlag = types.SimpleNamespace(TF32="TF32", **{f: f for f in _WEAK_TYPING_FLAGS})
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.TensorIOMode = types.SimpleNamespace(NONE="NONE", INPUT="INPUT", OUTPUT="OUTPUT")

    class ILogger:
        Severity = Severity

        def __init__(self):
            pass

    class Logger(ILogger):
        WARNING = Severity.WARNING

        def __init__(self, level=None):
            pass

        def log(self, severity, msg):
            pass

    def _error(logger, msg):
        """TensorRT reports a failure through the logger (then returns False / None)."""
        record.setdefault("errors", []).append(msg)
        logger.log(Severity.ERROR, msg)

    class Network:
        def __init__(self, flags):
            assert isinstance(flags, int) and flags >= 0, "create_network takes a bit mask of creation flags"
            self.flags, self.inputs = flags, []
            # TensorRT 11: strongly typed whatever the flags say
            self.strongly_typed = major >= 11 or bool(flags & (1 << strongly_typed_bit))

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return types.SimpleNamespace(name=self.inputs[i])

    class ParserError:
        """nvonnxparser::IParserError as the binding shows it: str() is one line naming the node, then the code and
        the description (python/src/parsers/pyOnnx.cpp)."""

        def __init__(self, index, node_name, op, code, desc):
            self.index, self.name, self.op, self._code, self._desc = index, node_name, op, code, desc

        def desc(self):
            return self._desc

        def node(self):
            return self.index

        def __str__(self):
            return (f"In node {self.index} with name: {self.name} and operator: {self.op} (fake parser): "
                    f"{self._code}: {self._desc}")

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.logger = network, logger
            self.errors = []

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

        def parse_from_file(self, path):
            """False, with errors, for a node outside the standard ONNX domain: TensorRT imports only standard ops
            (and plugins registered under the op's name, which this project has none of): ONNX Runtime's contrib ops
            and the medusa_export kernels cannot reach it."""
            import onnx

            model = onnx.load(path, load_external_data=False)
            ops = set()
            for i, node in enumerate(model.graph.node):  # the step graphs have no subgraphs (If / Loop bodies)
                subgraph = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                assert not any(a.type in subgraph for a in node.attribute)
                ops.add((node.domain or "", node.op_type))
                if node.domain not in ("", "ai.onnx"):
                    self.errors.append(ParserError(i, node.name, node.op_type, "UNSUPPORTED_NODE",
                                                   f"no importer for {node.domain}::{node.op_type}, and no plugin "
                                                   f"registered under that name"))
            record.setdefault("onnx_ops", set()).update(ops)
            if self.errors:
                _error(self.logger, str(self.errors[0]))
                return False
            s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            self.network.inputs = [x.name for x in s.get_inputs()]
            self.network.onnx = str(Path(path).resolve())
            return True

    class OptProfile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            # The real binding raises RuntimeError (it returns nothing) when min/opt/max are inconsistent.
            lo, opt, hi = tuple(lo), tuple(opt), tuple(hi)
            if not (len(lo) == len(opt) == len(hi)) or not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise RuntimeError("Shape provided for opt is inconsistent with other shapes.")
            self.shapes[name] = (lo, opt, hi)

    class TimingCache:
        """A blob ``timing:<device>:<entries>``: its header names the GPU it was measured on."""

        def __init__(self, data):
            self.data = data  # the blob it was made from (b"": a fresh cache)
            self.device = data.split(b":")[1].decode() if data else device

        def serialize(self):
            return b"timing:" + self.device.encode() + b":entries"

    class Config:
        def __init__(self):
            self.flags = {"TF32"}  # TensorRT enables TF32 by default
            self.pools, self.profiles, self.cache = {}, [], None

        def set_memory_pool_limit(self, pool, n):
            self.pools[pool] = n

        def set_flag(self, f):
            self.flags.add(f)

        def clear_flag(self, f):
            self.flags.discard(f)

        def add_optimization_profile(self, p):
            self.profiles.append(p)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            data = bytes(data)
            if data and not data.startswith(b"timing:"):
                return None  # a corrupt or foreign blob: no ITimingCache (set_timing_cache would refuse None)
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            if not isinstance(cache, TimingCache):
                raise TypeError("set_timing_cache(): incompatible function arguments")
            # NvInfer.h: a cache whose CUDA device properties differ from this GPU's is a failure (false) unless
            # ignoreMismatch.
            if cache.device != device and not ignore_mismatch:
                return False
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return OptProfile()

        def __init__(self, logger):
            self.logger = logger

        def build_serialized_network(self, network, config):
            if network.strongly_typed and set(config.flags) & set(_WEAK_TYPING_FLAGS):
                _error(self.logger, "BuilderFlag FP16/BF16/INT8/FP8 cannot be set for a strongly typed network.")
                return None
            if refuse_strongly_typed and network.strongly_typed and major < 11:
                record.setdefault("refused", []).append(network.onnx)
                _error(self.logger, "strongly typed build refused (fake)")
                return None
            dynamic = {n for n in network.inputs if n != "temperature"}  # temperature is the graph's one static input
            for i, p in enumerate(config.profiles):
                if set(p.shapes) != dynamic:  # TensorRT: every dynamic input needs shapes, and only inputs have any
                    _error(self.logger, f"optimization profile {i} has shapes for {sorted(set(p.shapes) - dynamic)} "
                                        f"and lacks {sorted(dynamic - set(p.shapes))}")
                    return None
            for p in config.profiles:
                for k in range(3):  # min, opt, max: each a consistent set of shapes
                    b, t = p.shapes["input_ids"][k]
                    b_kv, past = p.shapes["past_key_values.0.key"][k][:2]
                    assert p.shapes["position_ids"][k] == (b, t) and b_kv == b
                    assert p.shapes["attention_mask"][k] == (b, 1, t, past + t)
            record.setdefault("builds", []).append(
                {"strongly_typed": network.strongly_typed, "network_flags": network.flags,
                 "flags": sorted(config.flags),
                 "pools": dict(config.pools), "cache_in": config.cache.data if config.cache else None})
            plan = {"onnx": network.onnx, "profiles": [{k: [list(s) for s in v] for k, v in p.shapes.items()}
                                                       for p in config.profiles]}
            return json.dumps(plan).encode()

    class Engine:
        def __init__(self, plan):
            self.session = ort.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])
            self.inputs = {x.name: _ORT_TO_DT[x.type] for x in self.session.get_inputs()}
            self.outputs = {x.name: _ORT_TO_DT[x.type] for x in self.session.get_outputs()}
            self.extra = {name: "FLOAT" for name in record.get("extra_outputs", ())}  # outputs the graph lacks
            self.names = list(self.inputs) + list(self.outputs) + list(self.extra)
            self.profiles = plan["profiles"]

        @property
        def num_io_tensors(self):
            return len(self.names)

        @property
        def num_optimization_profiles(self):
            return len(self.profiles)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            if name in self.inputs:
                return "INPUT"
            return "OUTPUT" if name in self.outputs or name in self.extra else "NONE"  # NONE: not an I/O tensor

        def get_tensor_dtype(self, name):
            return _DT(self.inputs.get(name) or self.outputs.get(name) or self.extra[name])

        def is_shape_inference_io(self, name):
            # A shape tensor lives in host memory (set_tensor_address takes a host pointer): the graph's inputs are
            # all execution tensors unless a test says otherwise.
            return name in record.get("shape_io", ())

        def create_execution_context(self):
            if record.get("fail") == "context":  # what TensorRT does when the GPU is out of memory
                return None
            record["contexts"] = record.get("contexts", 0) + 1
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.profile, self.shapes, self.addr = engine, 0, {}, {}
            self.profile_stream = None  # the stream of the last profile switch (its copies run there)

        def set_optimization_profile_async(self, index, stream):
            # The real binding raises RuntimeError on failure; it never returns False.
            assert isinstance(stream, int), "stream_handle is the integer cudaStream_t"
            if record.get("fail") == "profile" or not 0 <= index < len(self.engine.profiles):
                raise RuntimeError("Error in set optimization profile async.")
            # Switching the profile invalidates the dynamic input shapes: set_input_shape must follow.
            self.profile, self.shapes, self.profile_stream = index, {}, stream
            record.setdefault("switches", []).append(index)
            return True

        def set_input_shape(self, name, shape):
            # Returns False (it does not raise) for a name that is not an input, or a shape outside the profile.
            if name not in self.engine.inputs or name not in self.engine.profiles[self.profile]:
                return False
            lo, _, hi = self.engine.profiles[self.profile][name]
            ok = len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))
            if ok:
                self.shapes[name] = tuple(shape)
            return ok

        def set_tensor_address(self, name, ptr):  # the binding returns False, it does not raise
            assert ptr % align == 0, f"{name} address {ptr} is not {align}-byte aligned"
            if record.get("fail") == "address" or name not in self.engine.names:
                return False
            self.addr[name] = ptr
            return True

        def execute_async_v3(self, stream):
            assert isinstance(stream, int), "stream_handle is the integer cudaStream_t"
            # The profile's copies were queued on the stream of set_optimization_profile_async: enqueuing on another
            # stream without synchronizing them is undefined behaviour.
            assert self.profile_stream in (None, stream), "profile switched on another stream than the enqueue's"
            if record.get("fail") == "execute":
                return False
            e = self.engine
            unbound = [n for n in e.names if not self.addr.get(n)]
            # enqueueV3 needs a non-null address for every input and output (else it logs an error, returns False).
            assert not unbound, f"execute_async_v3 with tensors that have no address: {unbound[:4]}"
            shapes = {}
            for name in e.inputs:
                shape = self.shapes.get(name, (1,) if name == "temperature" else None)
                assert shape is not None, f"no shape set for {name}"
                shapes[name] = shape
            (b, t), past = shapes["input_ids"], shapes["past_key_values.0.key"][1]
            assert shapes["attention_mask"] == (b, 1, t, past + t)
            record.setdefault("shapes", []).append((b, t, past))
            addr = dict(self.addr)  # the addresses and shapes of this enqueue; later set_* calls are for the next one

            def run():  # on the stream, after the work queued before it (the input copies)
                feeds = {name: cuda.read(addr[name], _DT_TO_NP[dt], shapes[name]) for name, dt in e.inputs.items()}
                outs = e.session.run(list(e.outputs), feeds)
                for name, value in zip(e.outputs, outs):
                    cuda.write(addr[name], value.astype(_DT_TO_NP[e.outputs[name]]))
            cuda.enqueue(stream, run)
            record["executions"] = record.get("executions", 0) + 1
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            try:
                return Engine(json.loads(bytes(data)))
            except ValueError:
                return None

    trt.ILogger, trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = ILogger, Logger, Builder, OnnxParser, Runtime
    trt.record = record
    return trt
