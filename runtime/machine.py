"""What a measurement ran on, recorded beside every benchmark figure (CPU model and the flags that change which
kernels run, cores, ONNX Runtime version): machines in one fleet differ (AVX2 only, or AVX-512 with VNNI/BF16).

    machine_info()   # {"cpu": "AMD EPYC ...", "flags": ["sse2", "avx2", "fma"], "cores": 2, "cpu_count": 64, ...}
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# sse2: every x86-64 CPU has it; `kernels.clipping_int8_products` tells x86 by it (avx2 alone missed x86 without it)
FLAGS = ("sse2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
         "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def usable_cpus() -> int:
    """The CPUs this process may run on (``taskset``, a container's cpuset), not all of the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def machine_info() -> dict:
    """CPU model, the `FLAGS` it has, ``cores``: the CPUs this process may run on (`usable_cpus`: what a benchmark's
    threads had), ``cpu_count``: the machine's, Python's and ONNX Runtime's versions."""
    cpu, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    info = {"cpu": cpu, "flags": [f for f in FLAGS if f in flags], "cores": usable_cpus(),
            "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def available_ram(swap: bool = False) -> int | None:
    """Bytes of memory available to new allocations: Linux's MemAvailable (plus SwapFree with ``swap``), or less
    under a container's memory limit (cgroup v2 ``memory.max`` less what it holds besides reclaimable file pages:
    ``memory.current`` counts the page cache of every file read); None where unknown."""
    found = []
    meminfo = _fields(Path("/proc/meminfo"), ":")
    if "MemAvailable" in meminfo:
        found.append((meminfo["MemAvailable"] + (meminfo.get("SwapFree", 0) if swap else 0)) * 1024)
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            used -= _fields(Path("/sys/fs/cgroup/memory.stat"), "").get("inactive_file", 0)
            found.append(max(int(limit) - used, 0))  # over its limit (it is reclaiming): nothing free
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _fields(path: Path, suffix: str) -> dict[str, int]:
    """``name[suffix] value ...`` lines of a kernel table as {name: value}; {} when unreadable."""
    out = {}
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                out[parts[0].removesuffix(suffix)] = int(parts[1])
    except OSError:
        pass
    return out
