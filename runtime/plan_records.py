"""What the manifest records of each TensorRT plan (`manifest.engines`): the engine builder writes these records,
the TensorRT backend checks and reads them (`backends/trt_compat.py`, `backends/trt_profiles.py`). Part of the typed
artifact spec that `runtime.manifest` reads; importable from there too.
"""

from __future__ import annotations

from dataclasses import dataclass

from .typed_json import FieldError

MAX_PROFILE_SIZE = 1 << 21  # tokens of a profile's range (past + new tokens stay within max_seq's bound, 2^20)
MAX_PROFILE_BATCH = 1024  # sequences of the batch profile (the lanes' bound; the builder makes up to 64)


@dataclass(frozen=True)
class ProfileRecord:
    name: str
    seq: tuple[int, int, int]  # new tokens: min, opt, max
    past: tuple[int, int, int]
    total: tuple[int, int, int]
    batch: tuple[int, int, int] = (1, 1, 1)  # sequences per step; > 1 only in the vanilla engine's "batch" profile

    def __post_init__(self) -> None:
        """What the TensorRT backend's `Profile` assumes: each range min <= opt <= max, at least one new token and
        one sequence, and total = past + new tokens at each point (a profile past them failed there, with a bare
        ValueError, once the engine had been deserialized)."""
        for name, most in (("seq", MAX_PROFILE_SIZE), ("past", MAX_PROFILE_SIZE), ("total", 2 * MAX_PROFILE_SIZE),
                           ("batch", MAX_PROFILE_BATCH)):
            r = getattr(self, name)
            if not 0 <= r[0] <= r[1] <= r[2] <= most:
                raise FieldError(name, f"must be min <= opt <= max within 0..{most}, not {list(r)}")
        if self.seq[0] < 1 or self.batch[0] < 1:
            raise FieldError("seq", "and batch must start at 1 or more (a step has a token, a sequence)")
        if tuple(self.total) != tuple(p + t for p, t in zip(self.past, self.seq)):
            raise FieldError("total", f"must be past + seq at each point, not {list(self.total)}")


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

    def __post_init__(self) -> None:
        """One-sequence profiles for a session's steps (the backend sizes its buffers by the largest), and at most
        one batch profile."""
        if not any(p.batch[2] == 1 for p in self.profiles):
            raise FieldError("profiles", "must hold a one-sequence profile (batch (1, 1, 1))")
        if sum(p.batch[2] > 1 for p in self.profiles) > 1:
            raise FieldError("profiles", "may hold one batch profile (batch max > 1) at most")
