"""Writing a file whole: into a temporary name beside it, then renamed over it, so that a reader (or a run stopped
mid-write) sees the old file or the new one, never half of one.

    write_whole(path, lambda f: f.write(data))           # bytes
    write_whole(path, lambda f: np.savez(f, **arrays))   # anything that writes to a binary file
    write_report(path, text)                             # a command's --json / --plot output
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable


def write_whole(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """An OSError while writing (a full disk) names ``path``: the file object's own errors name no file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    finally:
        tmp.unlink(missing_ok=True)


def write_report(path: Path, data: str | bytes) -> None:
    """Replace the file at ``path`` whole with ``data`` (text as UTF-8); through a symbolic link, its target is
    replaced, not the link."""
    payload = data.encode() if isinstance(data, str) else data
    path = Path(path)
    write_whole(path.resolve() if path.is_symlink() else path, lambda f: f.write(payload))
