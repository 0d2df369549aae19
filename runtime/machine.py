"""What a measurement ran on, recorded beside every benchmark figure (CPU model and the flags that change which
kernels run, cores, ONNX Runtime version): machines in one fleet differ (AVX2 only, or AVX-512 with VNNI/BF16).

    machine_info()   # {"cpu": "AMD EPYC ...", "flags": ["avx2", "fma"], "cores": 2, "onnxruntime": "1.2x"}
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
         "amx_tile", "amx_int8", "amx_bf16")


def usable_cpus() -> int:
    """The CPUs this process may run on (``taskset``, a container's cpuset), not all of the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def machine_info() -> dict:
    cpu, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    info = {"cpu": cpu, "flags": [f for f in FLAGS if f in flags], "cores": os.cpu_count(),
            "python": platform.python_version()}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def available_ram() -> int | None:
    """Bytes of memory available to new allocations: Linux's MemAvailable, or less under a container's memory limit
    (cgroup v2 ``memory.max`` less ``memory.current``); None where unknown."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None
