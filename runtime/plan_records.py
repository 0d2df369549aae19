"""What the manifest records of each TensorRT plan (`manifest.engines`): the engine builder writes these records,
the TensorRT backend checks and reads them (`backends/trt_compat.py`, `backends/trt_profiles.py`). Part of the typed
artifact spec that `runtime.manifest` reads; importable from there too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProfileRecord:
    name: str
    seq: tuple[int, int, int]  # new tokens: min, opt, max
    past: tuple[int, int, int]
    total: tuple[int, int, int]
    batch: tuple[int, int, int] = (1, 1, 1)  # sequences per step; > 1 only in the vanilla engine's "batch" profile


@dataclass(frozen=True)
class BuilderFlags:
    set: list[str]
    clear: list[str]


@dataclass(frozen=True)
class EngineRecord:
    """A TensorRT plan and what it runs on (checked by `backends/trt_compat.py` before loading)."""

    file: str
    onnx: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    cuda_runtime: str | None
    precision: str
    strongly_typed: bool
    builder_flags: BuilderFlags
    profiles: list[ProfileRecord]
    workspace_bytes: int | None
    timing_cache: str  # a file name only: the cache stays on the machine that built
    build_s: float
