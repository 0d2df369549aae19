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


def write_report(path: Path, data: str | bytes, make_parents: bool = False) -> None:
    """Replace the file at ``path`` whole with ``data`` (text as UTF-8); through a symbolic link, its target is
    replaced, not the link. ``make_parents``: the missing directories above it are made first, and removed again
    when the write fails (a full disk), so that a failed command leaves nothing behind."""
    payload = data.encode() if isinstance(data, str) else data
    path = Path(path)
    target = path.resolve() if path.is_symlink() else path
    made = _make_parents(target.parent) if make_parents else []
    try:
        write_whole(target, lambda f: f.write(payload))
    except BaseException:
        _remove_empty(made)
        raise


def _make_parents(directory: Path) -> list[Path]:
    """Make ``directory`` and the missing ones above it, as the system walks the path; those it made, top first."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    made: list[Path] = []
    try:
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:  # "missing/.." exists once "missing" does
                continue
            made.append(d)
    except BaseException:  # a deeper one failed (a full disk): none of them stays
        _remove_empty(made)
        raise
    return made


def _remove_empty(directories: list[Path]) -> None:
    """Remove ``directories`` (listed top first) where they are still empty, deepest first."""
    for directory in reversed(directories):
        try:
            os.rmdir(directory)
        except OSError:  # something else filled it meanwhile: it stays
            pass
