"""Can this machine build and run TensorRT engines? One answer, with a one-line reason when it cannot.

    status = check()                 # Availability(ok, reason, tensorrt_version, device, cuda_runtime)
    if not status.ok:
        print(status.reason)         # e.g. "TensorRT is not installed: pip install tensorrt (needs a CUDA GPU)"
    trt = import_tensorrt()          # the module, or BackendUnavailableError(reason)

Nothing here needs nvidia-smi: TensorRT is imported, the GPU is queried through cuda-python's runtime API.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..errors import BackendUnavailableError, first_line
from .cuda_buffers import CudaError, import_cudart, load_cuda

MIN_TENSORRT_MAJOR = 10
TENSORRT_HINT = "TensorRT is not installed: pip install tensorrt (needs a CUDA GPU)"


@dataclass(frozen=True)
class Device:
    index: int
    name: str  # e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: str  # "9.0"

    @property
    def sm(self) -> str:
        return "sm_" + self.compute_capability.replace(".", "")


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str  # "" when ok, else one line naming the problem and the fix
    tensorrt_version: str | None = None
    device: Device | None = None
    cuda_runtime: str | None = None


def tensorrt_major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0


def _tensorrt():
    """(module, "") or (None, reason)."""
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError:
        return None, TENSORRT_HINT
    except Exception as e:  # e.g. the pip meta-package without its libraries, or a CUDA library mismatch
        return None, (f"TensorRT is installed but cannot be loaded ({first_line(e, 160)}): "
                      "reinstall with pip install --force-reinstall tensorrt")
    version = getattr(trt, "__version__", "0")
    if tensorrt_major(version) < MIN_TENSORRT_MAJOR:
        return None, f"TensorRT {version} is too old: pip install 'tensorrt>={MIN_TENSORRT_MAJOR}'"
    return trt, ""


def import_tensorrt():
    """The `tensorrt` module (10 or newer); BackendUnavailableError with the install command otherwise."""
    trt, reason = _tensorrt()
    if trt is None:
        raise BackendUnavailableError(reason)
    return trt


def cuda_device(index: int = 0) -> tuple[Device | None, str | None, str]:
    """(device, CUDA runtime version, "") or (None, None, reason)."""
    try:
        import_cudart()
    except BackendUnavailableError as e:
        return None, None, str(e)
    try:
        cuda = load_cuda()
    except Exception as e:  # cuda-python present but libcudart cannot load
        return None, None, f"no CUDA device found: the CUDA runtime cannot be loaded ({str(e)[:120]})"
    try:
        count = cuda.device_count()
    except Exception as e:
        if isinstance(e, CudaError):  # its message already says what to do about that error
            return None, None, f"no CUDA device found: {e}"
        return None, None, f"no CUDA device found: {e} (no NVIDIA GPU or driver visible; check CUDA_VISIBLE_DEVICES)"
    if count == 0:
        return None, None, "no CUDA device found: the driver reports 0 GPUs (check CUDA_VISIBLE_DEVICES)"
    if index >= count:
        return None, None, f"no CUDA device found: device {index} asked for, {count} visible"
    try:
        name, major, minor = cuda.device_properties(index)
        runtime = cuda.runtime_version()
    except Exception as e:
        return None, None, f"no CUDA device found: {e}"
    return Device(index, name, f"{major}.{minor}"), runtime, ""


@functools.lru_cache(maxsize=None)
def check(device_index: int = 0) -> Availability:
    """TensorRT first (the usual missing piece), then cuda-python, then a visible GPU. Cached per process."""
    trt, reason = _tensorrt()
    if trt is None:
        return Availability(False, reason)
    device, runtime, reason = cuda_device(device_index)
    if device is None:
        return Availability(False, reason, trt.__version__)
    return Availability(True, "", trt.__version__, device, runtime)


def require(device_index: int = 0) -> Availability:
    status = check(device_index)
    if not status.ok:
        raise BackendUnavailableError(status.reason)
    return status


def skip_reason() -> str | None:
    """For ``pytest.mark.skipif``: None when TensorRT and a GPU are usable, else the reason."""
    status = check()
    return None if status.ok else status.reason
