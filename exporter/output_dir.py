"""Where `build` writes: only a new directory, an empty one, or an earlier medusa-export artifact is replaced.

    check_out_dir(Path("artifacts/smollm2"))        # before any export work: InputError otherwise
    work = new_work_dir(out)                         # artifacts/smollm2.partial-XXXX, next to it
    ... write everything into work ...
    replace_dir(work, out)                           # the swap; the old artifact is removed only after it

A directory that holds anything but an artifact's own files (those its manifest lists) is never touched:
``build --out ~/work`` must not delete ``~/work``. No torch here, so the CLI checks before the long export.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from medusa_export.runtime.errors import InputError
from medusa_export.runtime.manifest import MANIFEST, listed_files


def check_out_dir(out: Path) -> None:
    """InputError (one line, naming the path) unless ``out`` may be replaced by a new artifact."""
    if out.is_symlink():
        raise InputError(f"--out {out} is a symbolic link: give a real directory path for the artifact")
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"--out {out} is an existing file, not an artifact directory: choose another --out")
    if not any(out.iterdir()):
        return
    listed = listed_files(out)
    if listed is None:
        raise InputError(f"--out {out} exists and is not a medusa-export artifact (no {MANIFEST} of ours): "
                         f"refusing to replace it; choose a new or empty directory")
    foreign = sorted(p for p in out.rglob("*") if not p.is_dir() and p.relative_to(out).as_posix() not in listed)
    if foreign:
        raise InputError(f"--out {out} is an artifact but also holds {foreign[0].relative_to(out)} (not one of its "
                         f"files): move it out, or choose another --out")


def new_work_dir(out: Path) -> Path:
    """An empty directory beside ``out`` (same file system, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=out.name + ".partial-", dir=out.parent))
    work.chmod(0o755)
    return work


def replace_dir(work: Path, out: Path) -> None:
    """Swap the finished ``work`` into ``out``. An earlier artifact is renamed aside first and removed only
    after the swap; if the swap fails it is put back."""
    check_out_dir(out)  # again: something may have appeared there during the export
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{int(time.time() * 1000)}")
        out.rename(old)
    try:
        work.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
