"""Reading a small file whose path someone else chose (a tree file, an artifact's JSON): only a regular file, and
only up to a limit, so that a FIFO cannot hang the reader and ``/dev/zero`` or a huge file cannot fill the memory.

    data = read_bounded(path, 1 << 20)     # bytes; OSError (strerror says why) for anything else
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def read_bounded(path: str | Path, limit: int) -> bytes:
    """The whole of ``path``, a regular file of at most ``limit`` bytes. OSError otherwise: ``strerror`` "not a
    regular file" (a directory, FIFO, device), or "larger than N bytes"; or the system's own error."""
    # O_NONBLOCK: opening a FIFO for reading would wait for a writer; a regular file ignores the flag
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))  # (Windows: no FIFOs)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
        # The whole file in one read where the system allows (one bytes object, which join returns as it is): read
        # in 1 MB chunks and joined, a file took twice its size in memory (a 1.5 GB graph file: 3.1 GB)
        chunks, size = [], 0
        while chunk := os.read(fd, min(max(info.st_size + 1 - size, 1 << 20), limit + 1 - size)):  # cut at the limit
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
        return b"".join(chunks)
    finally:
        os.close(fd)
