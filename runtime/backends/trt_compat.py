"""Is a serialized TensorRT engine usable here? (pure Python)

A plan file only runs with the TensorRT version that built it and on GPUs of the same compute capability.
The builder records both in ``manifest.engines[kind]``; `check` compares them with this machine before
anything is deserialised, so a stale engine fails with a one-line fix instead of a TensorRT crash.

    check(record, Platform("10.5.0", "NVIDIA A10", "8.6"), directory="artifacts/gpu")
    # ArtifactError: engine medusa.plan was built with TensorRT 10.3.0 for NVIDIA H100 (sm_90); this machine
    # has TensorRT 10.5.0 / NVIDIA A10 (sm_86): rebuild with `medusa-export build --engine trt` ...
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ArtifactError, EngineError
from ..manifest import PORTABLE, EngineRecord, Manifest


@dataclass(frozen=True)
class Platform:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"


def short_version(version: str, parts: int = 3) -> str:
    return ".".join(str(version).split(".")[:parts])


def sm(compute_capability: str) -> str:
    return "sm_" + str(compute_capability).replace(".", "")


def rebuild_hint(directory: str | None = None) -> str:
    d = str(directory) if directory else "DIR"
    return (f"rebuild with `medusa-export build --out {d} --engine trt` "
            f"(or only the engines: `medusa-export build-engines {d}`)")


def bind_address(ctx, name: str, address: int) -> None:
    """``ctx.set_tensor_address(name, address)``, which returns False (rather than raising) for a name the engine
    does not have or an address it cannot take (TensorRT wants 256-byte alignment): an EngineError then, not a step
    run on a tensor left where an earlier step put it."""
    if not ctx.set_tensor_address(name, address):
        raise EngineError(f"TensorRT refused the device address of {name}: the engine does not match the artifact's "
                          f"tensors; {rebuild_hint()}")


def switch_profile(ctx, profile: int, stream_handle: int) -> bool:
    """``ctx.set_optimization_profile_async``: whether the context now runs ``profile``. The Python binding raises
    RuntimeError on failure (it does not return False)."""
    try:
        return bool(ctx.set_optimization_profile_async(profile, stream_handle))
    except RuntimeError:
        return False


def check_engine_io(trt, engine, name: str, want_in: list[str], want_out: list[str], hint: str) -> None:
    """ArtifactError unless engine ``engine`` (file ``name``) has exactly the tensors ``want_in`` as inputs and
    ``want_out`` as outputs, none of them a shape tensor: execute_async_v3 fails unless every I/O tensor has an
    address, and a shape tensor is read from host memory where the backend binds device memory."""
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    lacking = [x for x in want_in + want_out if x not in names]
    if lacking:
        raise ArtifactError(f"engine {name} lacks tensors {lacking[:4]}: {hint}")
    for wanted, mode, what in ((want_in, trt.TensorIOMode.INPUT, "an input"),
                               (want_out, trt.TensorIOMode.OUTPUT, "an output")):
        for x in wanted:
            if engine.get_tensor_mode(x) != mode:
                raise ArtifactError(f"engine {name}: {x} is not {what}: {hint}")
    extra = sorted(names - set(want_in) - set(want_out))
    if extra:
        raise ArtifactError(f"engine {name} has tensors the artifact's graph does not ({extra[:4]}): {hint}")
    shape_io = [x for x in want_in if engine.is_shape_inference_io(x)]
    if shape_io:
        raise ArtifactError(f"engine {name} takes {shape_io[:4]} as shape tensors (host memory), not as the device "
                            f"tensors this backend binds: {hint}")


def require_portable(manifest: Manifest, directory) -> None:
    """ArtifactError unless the artifact holds portable graphs: TensorRT cannot parse the fused ONNX Runtime ones."""
    if manifest.graph_format != PORTABLE:
        raise ArtifactError(f"{directory} holds ONNX Runtime graphs (fused operators TensorRT cannot parse): "
                            f"rebuild it with `medusa-export build --out {directory} --engine trt` (portable graphs)")


def check(record: EngineRecord, current: Platform, directory: str | None = None) -> str | None:
    """ArtifactError when the engine cannot run here; a warning string when it can but the GPU model differs
    (same compute capability: TensorRT runs it, possibly with kernels tuned for the other GPU); else None."""
    name = record.file
    built_v, built_gpu, built_cc = record.tensorrt_version, record.gpu_name, record.compute_capability
    same_version = short_version(built_v) == short_version(current.tensorrt_version)
    same_cc = built_cc == str(current.compute_capability)
    if not (same_version and same_cc):
        raise ArtifactError(
            f"engine {name} was built with TensorRT {short_version(built_v)} for {built_gpu} ({sm(built_cc)}); "
            f"this machine has TensorRT {short_version(current.tensorrt_version)} / {current.gpu_name} "
            f"({sm(current.compute_capability)}): {rebuild_hint(directory)}"
        )
    if built_gpu != current.gpu_name:
        return (f"engine {name} was tuned on {built_gpu}, this GPU is {current.gpu_name} (same {sm(built_cc)}): "
                f"it runs, but rebuilding here may be faster")
    return None
