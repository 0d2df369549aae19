"""A stand-in for the CUDA runtime used by the TensorRT tests (tests/fake_trt.py, tests/test_trt_backend.py): device
memory is one host byte array, and stream work runs only when the stream is synchronized."""

from __future__ import annotations

import numpy as np

from medusa_export.runtime.backends import cuda_buffers


class FakeCuda:
    """Device memory = one byte array; pointer = offset (never 0).

    Work on a stream runs when the stream is synchronized, in the order it was queued (the calls check their
    arguments at once). That is the latest a GPU may run it, so the fake catches what real CUDA allows to go wrong:

    * a device-to-host copy reaches the host array only at synchronize (until then it holds garbage);
    * a host-to-device copy reads its host array only then too: the CUDA runtime's "API synchronization behavior"
      page says a cudaMemcpyAsync between pageable host memory and device memory only *might* be synchronous, so the
      host source must stay alive and unchanged until the stream is synchronized;
    * work on one stream sees another stream's results only after that stream was synchronized.
    """

    def __init__(self, nbytes: int = 1 << 24) -> None:
        self.mem = np.zeros(nbytes, np.uint8)
        self.next = 4096
        self.live: dict[int, int] = {}
        self.streams = 0
        self.calls = {"d2d_2d": 0, "h2d": 0, "d2h": 0}
        self.queue: dict = {}  # stream -> device work not run yet (callables, in stream order)

    def malloc(self, n):
        ptr = cuda_buffers.round_up(self.next)
        assert ptr + n <= self.mem.size, "fake device out of memory"
        self.next = ptr + n
        self.live[ptr] = n
        return ptr

    def free(self, ptr):
        for stream in list(self.queue):  # cudaFree waits for the device's queued work (implicit synchronization)
            self.synchronize(stream)
        assert self.live.pop(ptr, None) is not None, "double free"

    def stream_create(self):
        self.streams += 1
        return self.streams

    def stream_destroy(self, stream):
        assert not self.queue.get(stream), "stream destroyed with work still queued (synchronize it first)"

    def enqueue(self, stream, work):
        assert isinstance(stream, int) and stream > 0, "device work goes on one of the streams made here"
        self.queue.setdefault(stream, []).append(work)

    def synchronize(self, stream):
        for work in self.queue.pop(stream, []):
            work()

    def set_device(self, index):
        assert index == 0

    @staticmethod
    def handle(stream):
        return int(stream)

    def _check(self, ptr, n):
        assert any(b <= ptr and ptr + n <= b + size for b, size in self.live.items()), f"access {ptr}+{n} outside allocations"

    def h2d(self, dst, src, stream):
        self.calls["h2d"] += 1
        self._check(dst, src.nbytes)

        def copy():  # reads the host array now, not when h2d was called
            self.mem[dst:dst + src.nbytes] = np.ascontiguousarray(src).view(np.uint8).reshape(-1)
        self.enqueue(stream, copy)

    def d2h(self, dst, src, stream):
        self.calls["d2h"] += 1
        assert dst.flags.c_contiguous
        self._check(src, dst.nbytes)
        host = dst.reshape(-1).view(np.uint8)
        host[:] = 0xFF  # garbage until the stream is synchronized

        def copy():
            host[:] = self.mem[src:src + dst.nbytes]
        self.enqueue(stream, copy)

    def memset(self, dst, value, n, stream):
        self._check(dst, n)

        def fill():
            self.mem[dst:dst + n] = value
        self.enqueue(stream, fill)

    def d2d_2d(self, dst, dpitch, src, spitch, width, height, stream):
        self.calls["d2d_2d"] += 1
        assert width <= dpitch and width <= spitch
        for r in range(height):
            s, d = src + r * spitch, dst + r * dpitch
            assert s + width <= d or d + width <= s, "overlapping device copy"
            self._check(s, width)
            self._check(d, width)

        def copy():
            for r in range(height):
                s, d = src + r * spitch, dst + r * dpitch
                self.mem[d:d + width] = self.mem[s:s + width]
        self.enqueue(stream, copy)

    def read(self, ptr, dtype, shape):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self.mem[ptr:ptr + n].view(dtype).reshape(shape).copy()

    def write(self, ptr, array):
        a = np.ascontiguousarray(array)
        self._check(ptr, a.nbytes)
        self.mem[ptr:ptr + a.nbytes] = a.view(np.uint8).reshape(-1)
