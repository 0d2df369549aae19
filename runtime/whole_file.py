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

from .links import follow_links


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
    target = follow_links(path) if path.is_symlink() else path  # a loop of links: OSError, nothing replaced
    made = _make(missing_parents(target)) if make_parents else []
    try:
        write_whole(target, lambda f: f.write(payload))
    except BaseException:
        remove_empty(made)
        raise


def missing_parents(path: Path) -> list[Path]:
    """The directories above ``path`` that do not exist yet, outermost first."""
    missing = [p for p in Path(path).absolute().parents if not p.exists()]
    return missing[::-1]


def remove_empty(directories: list[Path]) -> None:
    """Remove ``directories`` (outermost first, as `missing_parents` lists them), innermost first, while empty: a
    failed command leaves no folders it made."""
    for d in reversed(directories):
        try:
            d.rmdir()
        except OSError:  # not empty (something else was put there meanwhile), or already gone
            return


def _make(directories: list[Path]) -> list[Path]:
    """Make ``directories`` (outermost first), as the system walks each path; those it made. When one fails (a full
    disk), those made before it are removed again."""
    made: list[Path] = []
    try:
        for d in directories:
            try:
                d.mkdir()
            except FileExistsError:  # "missing/.." exists once "missing" does
                continue
            made.append(d)
    except BaseException:
        remove_empty(made)
        raise
    return made


def readable_as_made(path: Path, executable: bool = False) -> None:
    """Give ``path`` the mode a file made with ``open`` has (0666 less the umask; 0777 for an ``executable`` one, as
    a linker makes it). Libraries that write through a private temporary file (safetensors' ``save_file``, mkstemp)
    leave 0600: another user serving or checking the artifact could not read it."""
    os.chmod(path, (0o777 if executable else 0o666) & ~_umask())


def _umask() -> int:
    """This process's umask, read without changing it where Linux tells it (setting and resetting it races with
    threads that create files meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
