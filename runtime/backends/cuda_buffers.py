"""A thin layer over the CUDA runtime (cuda-python) for the TensorRT backend: device memory, streams, copies.

    cuda = load_cuda()                      # BackendUnavailableError with the pip command if missing
    arena = DeviceArena(cuda, [1024, 4096]) # one cudaMalloc, 256-byte aligned pieces
    stream = cuda.stream_create()
    cuda.h2d(arena.ptrs[0], np.arange(128, dtype=np.int64), stream)

Host sides are numpy arrays (their ``.nbytes`` is the copy size); device sides are integer addresses. No torch.
Tests swap `load_cuda` for a fake with the same methods, so the backend's address arithmetic runs on a CPU.
"""

from __future__ import annotations

import numpy as np

from ..errors import BackendUnavailableError, EngineError

ALIGN = 256  # TensorRT wants every tensor address aligned to 256 bytes (IExecutionContext::setTensorAddress)

CUDA_PYTHON_HINT = "cuda-python is not installed: pip install cuda-python (the TensorRT backend needs it for device memory)"


def round_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def import_cudart():
    """The cuda-python runtime module: ``cuda.bindings.runtime`` (cuda-python >= 12.6), else the older ``cuda.cudart``."""
    try:
        from cuda.bindings import runtime as cudart  # noqa: PLC0415

        return cudart
    except ImportError:
        pass
    try:
        from cuda import cudart  # noqa: PLC0415

        return cudart
    except ImportError:
        raise BackendUnavailableError(CUDA_PYTHON_HINT) from None


# What to do about a failed CUDA runtime call, by its cudaError_t name (cuda-python returns the error first; on
# failure the results after it are None). Anything else: look at the GPU.
_HINTS = {
    "cudaErrorMemoryAllocation": "the GPU is out of memory: free it or use a smaller --max-seq",
    "cudaErrorInsufficientDriver": "the NVIDIA driver is missing or older than this CUDA runtime: update it",
    "cudaErrorNoDevice": "no NVIDIA GPU is visible: check nvidia-smi and CUDA_VISIBLE_DEVICES",
    "cudaErrorInvalidDevice": "no such GPU: check nvidia-smi and CUDA_VISIBLE_DEVICES",
}


def error_hint(name: str) -> str:
    return _HINTS.get(name, "check the GPU with nvidia-smi")


class CudaError(EngineError):
    """A CUDA runtime call failed; the CLI shows it as one line (exit 2)."""


class Cuda:
    """The few CUDA runtime calls the backend needs, with error checking. Every cuda-python call returns
    ``(cudaError_t, *results)``."""

    def __init__(self, cudart) -> None:
        self.rt = cudart
        kind = cudart.cudaMemcpyKind
        self.H2D, self.D2H, self.D2D = kind.cudaMemcpyHostToDevice, kind.cudaMemcpyDeviceToHost, kind.cudaMemcpyDeviceToDevice

    def _check(self, result, what: str):
        err, rest = result[0], result[1:]
        if int(getattr(err, "value", err)) != 0:
            try:
                name = self.rt.cudaGetErrorName(err)[1]
                name = name.decode() if isinstance(name, bytes) else str(name)
            except Exception:  # pragma: no cover - best effort
                name = str(err)
            raise CudaError(f"{what} failed: {name} ({error_hint(name)})")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else rest

    # device -------------------------------------------------------------------------------------------
    def device_count(self) -> int:
        return int(self._check(self.rt.cudaGetDeviceCount(), "cudaGetDeviceCount"))

    def set_device(self, index: int) -> None:
        self._check(self.rt.cudaSetDevice(index), f"cudaSetDevice({index})")

    def device_properties(self, index: int) -> tuple[str, int, int]:
        """(name, major, minor) of device ``index``."""
        props = self._check(self.rt.cudaGetDeviceProperties(index), f"cudaGetDeviceProperties({index})")
        name = props.name
        if isinstance(name, (bytes, bytearray)):
            name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
        return str(name).strip(), int(props.major), int(props.minor)

    def runtime_version(self) -> str:
        v = int(self._check(self.rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))
        return f"{v // 1000}.{v % 1000 // 10}"

    def driver_version(self) -> str:
        v = int(self._check(self.rt.cudaDriverGetVersion(), "cudaDriverGetVersion"))
        return f"{v // 1000}.{v % 1000 // 10}"

    # memory -------------------------------------------------------------------------------------------
    def malloc(self, nbytes: int) -> int:
        return int(self._check(self.rt.cudaMalloc(max(int(nbytes), 1)), f"cudaMalloc({nbytes} bytes)"))

    def free(self, ptr: int) -> None:
        self._check(self.rt.cudaFree(ptr), "cudaFree")

    # streams ------------------------------------------------------------------------------------------
    def stream_create(self):
        return self._check(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def stream_destroy(self, stream) -> None:
        self._check(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def synchronize(self, stream) -> None:
        self._check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    @staticmethod
    def handle(stream) -> int:
        """The integer ``cudaStream_t`` that TensorRT's ``execute_async_v3`` takes: ``int(stream)`` is the handle.
        (Not ``stream.getPtr()``: that is the address of the object's storage holding the handle.)"""
        return int(stream)

    # copies (all on ``stream``) -----------------------------------------------------------------------
    def h2d(self, dst: int, src: np.ndarray, stream) -> None:
        # From pageable memory the call returns once ``src`` is staged, so the caller may reuse it.
        self._check(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, self.H2D, stream), "cudaMemcpyAsync H2D")

    def d2h(self, dst: np.ndarray, src: int, stream) -> None:
        if not dst.flags.c_contiguous:
            raise ValueError("d2h needs a contiguous host array")
        self._check(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, self.D2H, stream), "cudaMemcpyAsync D2H")

    def memset(self, dst: int, value: int, nbytes: int, stream) -> None:
        self._check(self.rt.cudaMemsetAsync(dst, value, nbytes, stream), "cudaMemsetAsync")

    def d2d_2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, stream) -> None:
        """``height`` rows of ``width`` bytes: row r goes from ``src + r*spitch`` to ``dst + r*dpitch``.
        One call moves the same KV rows in every layer (layers are ``pitch`` bytes apart)."""
        self._check(self.rt.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, self.D2D, stream),
                    "cudaMemcpy2DAsync D2D")


def load_cuda() -> Cuda:
    """The CUDA runtime wrapper; raises BackendUnavailableError (with the pip command) when cuda-python is missing."""
    return Cuda(import_cudart())


class DeviceArena:
    """One device allocation carved into 256-byte aligned pieces (``ptrs[i]`` has room for ``sizes[i]`` bytes).
    Freed by `free()` or when garbage collected."""

    def __init__(self, cuda, sizes: list[int]) -> None:
        offsets, total = [], 0
        for n in sizes:
            offsets.append(total)
            total += round_up(max(int(n), 1))
        self.cuda = cuda
        self.nbytes = total
        self.base = cuda.malloc(total)
        self.ptrs = [self.base + o for o in offsets]

    def free(self) -> None:
        if self.base is not None:
            base, self.base = self.base, None
            try:
                self.cuda.free(base)
            except Exception:  # interpreter shutdown or a dead context: nothing more to do
                pass

    def __del__(self) -> None:
        self.free()
