"""What the machine offers, read from the kernel's tables (`runtime/machine.py`)."""

from __future__ import annotations

from pathlib import Path

from medusa_export.runtime import machine

GiB = 1 << 30


def _kernel(monkeypatch, tables: dict[str, str]) -> None:
    """The kernel files ``available_ram`` reads, by path: their text (a missing one raises as the file would)."""
    def read_text(self, *args, **kwargs):
        if str(self) not in tables:
            raise FileNotFoundError(str(self))
        return tables[str(self)]

    monkeypatch.setattr(Path, "read_text", read_text)


def test_a_containers_page_cache_counts_as_free_and_swap_only_when_asked(monkeypatch):
    """memory.current counts the page cache of every file read (a checkpoint just read: gigabytes); it is
    reclaimable, so a model that fits was refused. Swap counts for what may be slow but loads (a model's weights)."""
    _kernel(monkeypatch, {
        "/proc/meminfo": "MemTotal: 33554432 kB\nMemAvailable: 16777216 kB\nSwapFree: 8388608 kB\n",
        "/sys/fs/cgroup/memory.max": f"{12 * GiB}\n",
        "/sys/fs/cgroup/memory.current": f"{10 * GiB}\n",
        "/sys/fs/cgroup/memory.stat": f"anon {2 * GiB}\ninactive_file {7 * GiB}\nactive_file {GiB}\n",
    })
    assert machine.available_ram() == 12 * GiB - 3 * GiB  # the limit less what is not reclaimable
    _kernel(monkeypatch, {"/proc/meminfo": "MemAvailable: 1048576 kB\nSwapFree: 2097152 kB\n"})
    assert machine.available_ram() == GiB and machine.available_ram(swap=True) == 3 * GiB
    _kernel(monkeypatch, {})
    assert machine.available_ram() is None
