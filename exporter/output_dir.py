"""Where commands write, checked before any long work: `build` replaces only a new directory, an empty one, or an
earlier medusa-export artifact; `train-heads` only a new or empty directory or its own earlier output (`train_out_dir`); report
files (``--json``, ``--plot``, ``calibrate-tree --out``) go into a directory that exists and takes new files.

    check_out_dir(Path("artifacts/smollm2"))        # before any export work: InputError otherwise
    work = new_work_dir(out)                         # artifacts/smollm2.partial-XXXX, next to it
    ... write everything into work ...
    replace_dir(work, out)                           # the swap; the old artifact is removed only after it

    check_out_file(Path("bench.json"), "--json")      # not a directory, its directory exists and is writable

A directory that holds anything but an artifact's own files (those its manifest lists) is never touched:
``build --out ~/work`` must not delete ``~/work``. No torch here, so the CLI checks before the long export.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt  # Windows: a byte range lock, released with its process too
except ImportError:
    msvcrt = None

from medusa_export.runtime.errors import InputError
from medusa_export.runtime.links import follow_links
from medusa_export.runtime.manifest import MANIFEST, UNFINISHED, building, listed_files


def check_out_dir(out: Path) -> None:
    """InputError (one line, naming the path) unless ``out`` may be replaced by a new artifact."""
    check_replaceable(out, "build")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is an existing file, not an artifact directory: choose another --out")
    # an artifact inside another one is a foreign folder of that one
    if (above := artifact_holding(out)) is not None:
        raise InputError(f"--out {out} lies inside the artifact {above}, which could then never be rebuilt in "
                         f"place: choose a path outside it")
    check_can_create(out, "--out")  # the work directory is made beside ``out``
    if not out.exists() or not any(out.iterdir()):
        return
    listed = listed_files(out)
    if listed is None:
        raise InputError(f"--out {out} exists and is not a medusa-export artifact (no {MANIFEST} of ours): "
                         f"refusing to replace it; choose a new or empty directory")
    # Directories holding listed files are the artifact's; anything else is not (an empty folder, a link to one)
    folders = {parent.as_posix() for name in listed for parent in Path(name).parents}
    listed = listed | {UNFINISHED}  # a build killed between its swap and removing its mark: still ours
    # A link is never the artifact's (build writes none), even under a listed name: it points at someone's file
    foreign = sorted(p for p in out.rglob("*") if p.is_symlink() or (p.relative_to(out).as_posix() not in listed and
                     (not p.is_dir() or p.relative_to(out).as_posix() not in folders)))
    if foreign:
        raise InputError(f"--out {out} is an artifact but also holds {foreign[0].relative_to(out)} (not one of its "
                         f"files): move it out, or choose another --out")


def artifact_holding(path: Path, itself: bool = False) -> Path | None:
    """The artifact directory ``path`` lies inside (by its path as written, or through links), or None; with
    ``itself``, ``path`` may be that directory."""
    written = Path(os.path.abspath(path))
    real = resolved(path)  # None for a loop of links: the caller's other checks name what is wrong
    candidates = [*([written] if itself else []), *written.parents]
    if real is not None:
        candidates += [*([real] if itself else []), *real.parents]
    return next((d for d in dict.fromkeys(candidates) if (d / MANIFEST).is_file() and listed_files(d) is not None),
                None)


def check_replaceable(out: Path, command: str) -> None:
    """InputError unless ``--out`` can be replaced whole by a directory made beside it and renamed into place
    (`build`, `train-heads --mode medusa2`): not the current directory or one above it, a name that prints, and a
    name of its own (not "." or "..")."""
    try:
        here = Path.cwd()
    except OSError:  # the current directory was removed: nothing to protect there
        here = None
    if here is not None and out.resolve() in (here, *here.parents):  # cwd() is resolved: compare like with like
        raise InputError(f"--out {out} is or holds the current directory, which {command} would replace whole: give "
                         f"another directory, or run the command from outside it")
    if not str(out).isprintable():  # the output's name goes into every later line that names it
        raise InputError(f"--out {str(out)!r:.120} holds a character that does not print (a newline, a control "
                         f"character): give a plain directory name")
    if out.name in ("", ".."):  # "ART/heads/..": the work directory made beside it would land inside it
        raise InputError(f"--out {out} does not name a directory by its own name: give it as "
                         f"{os.path.normpath(os.path.abspath(out))}")
    if out.is_symlink():  # the swap would replace the link, never the directory it points at
        raise InputError(f"--out {out} is a symbolic link: give a real directory path")


def check_can_create(path: Path, flag: str) -> None:
    """InputError unless ``path`` (or a sibling of it) can be created: the nearest existing directory above it must
    be a directory that takes new entries. Probed by making and removing an empty directory there, since
    permission bits say nothing for root or for /proc."""
    above = Path(os.path.abspath(path)).parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise InputError(f"{flag} {path}: {above} is a file, not a directory: choose a path under a directory")
    _probe(above, flag, path)


PROBE_PREFIX = ".medusa-export-probe-"  # the empty directory `_probe` makes and removes at once


def _probe(directory: Path, flag: str, path: Path) -> None:
    """InputError unless an entry can be made in ``directory`` (made and removed again: nothing is left)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=PROBE_PREFIX, dir=directory))
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot create files in {directory} ({e.strerror}): choose a writable "
                         f"directory") from None


def check_dir_path(path: Path, flag: str) -> None:
    """InputError unless ``path`` is a directory that takes new files, or one that can be made."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path} is an existing file, not a directory: choose another {flag}")
    if path.is_dir():
        _probe(path, flag, path)
    else:
        check_can_create(path, flag)


def check_out_file(path: Path, flag: str, make_parents: bool = False, inputs: tuple = ()) -> None:
    """InputError unless a file can be written at ``path``: not a directory, not under a file, its directory
    existing (or, with ``make_parents``, creatable) and writable, and neither one of the command's ``inputs``
    (files, or directories such as the artifact) nor inside one, its name all printing characters (it is named in
    the command's last line). Called before the work whose result it holds."""
    if not str(path).isprintable():
        raise InputError(f"{flag} {str(path)!r:.120} holds a character that does not print (a newline, a control "
                         f"character): give a plain file name")
    if str(path) == "-":  # read as standard output elsewhere: a file named "-" would appear in the current directory
        raise InputError(f"{flag} -: the report is written to a file, not to standard output (which shows the "
                         f"command's summary): give a file path")
    _check_not_an_input(path, flag, inputs)
    if path.is_symlink():  # the report replaces the link's target: check that instead
        try:
            path = follow_links(path)
        except OSError:
            raise InputError(f"{flag} {path} is a loop of symbolic links: give the path of a file") from None
    if path.is_dir():
        raise InputError(f"{flag} {path} is a directory: give the path of a file to write")
    if path.exists() and not path.is_file():  # written whole and swapped in: a device or FIFO would be replaced
        raise InputError(f"{flag} {path} is not a regular file (a device, FIFO or socket): give the path of a file")
    if not make_parents and not path.parent.is_dir():
        what = "is a file" if path.parent.exists() else "does not exist"
        raise InputError(f"{flag} {path}: the directory {path.parent} {what}: create it first or choose another path")
    if make_parents:
        _check_parents_can_be_made(path, flag)
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{flag} {path} is not writable: choose another path")
    check_can_create(path, flag)


def _check_parents_can_be_made(path: Path, flag: str) -> None:
    """The nearest entry above ``path`` that is there, as the system walks the path (no ``..`` folded away as text),
    must be a directory: a file there (``afile/../x``) or a symbolic link to nothing failed only when the report
    was written, after the work."""
    for above in path.parents:
        if not os.path.lexists(above):
            continue  # made with its parents (a component under a file is not there either: its parent tells)
        if os.path.islink(above) and not os.path.exists(above):
            raise InputError(f"{flag} {path}: {above} is a symbolic link to nothing: make its target or choose "
                             f"another path")
        if not os.path.isdir(above):
            raise InputError(f"{flag} {path}: {above} is a file, not a directory: choose another path")
        return


def resolved(path) -> Path | None:
    """``path`` with its links followed, or None where that fails (a loop of links: whoever opens it names it)."""
    try:
        return follow_links(path)
    except OSError:  # a loop of links: whoever opens it names the problem
        return None


def within(path: Path, top: Path) -> bool:
    """Whether resolved ``path`` is ``top`` or lies inside it."""
    return path == top or top in path.parents


def _check_not_an_input(path: Path, flag: str, inputs: tuple) -> None:
    """A report written over what the command reads would destroy it (a manifest, the prompts file)."""
    target = resolved(path)
    if target is None:  # a symlink loop: the checks after this one name it
        return
    for given in inputs:
        source = resolved(given) if given is not None and str(given).strip() else None
        if source is not None and within(target, source):
            raise InputError(f"{flag} {path} would overwrite {'a file in ' if target != source else ''}{given}, "
                             f"which this command reads (or writes too): choose another path")


def new_work_dir(out: Path) -> Path:
    """A directory beside ``out`` (same file system, so the final rename is atomic) marked unfinished, the mark
    locked by this process until `release_work_dir`. Work directories of earlier builds of ``out`` whose mark no
    process holds (killed builds) are removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    work = Path(tempfile.mkdtemp(prefix=out.name + ".partial-", dir=out.parent))
    work.chmod(0o755)
    fd = os.open(work / UNFINISHED, os.O_CREAT | os.O_RDWR, 0o644)
    try_lock(fd)  # a new file, so it is ours; a lock dies with its process: how a later build knows this one is gone
    _LOCKS[str(work)] = fd
    building(work, True)
    return work


def release_work_dir(work: Path) -> None:
    """This process no longer builds ``work`` (swapped into place, or removed after a failure)."""
    fd = _LOCKS.pop(str(work), None)
    if fd is not None:
        os.close(fd)
    building(work, False)


def try_lock(fd: int) -> bool:
    """Take an exclusive advisory lock on the open file ``fd`` without waiting: False when another process holds it.
    The lock is released when its process ends, however it ends. Shared by `build`'s work directories and
    train-heads' lock on --out (`train_out_dir.train_out_lock`). No locking on this system: True."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        elif msvcrt is not None:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _remove_abandoned(out: Path) -> None:
    """Remove the work directories of earlier builds of ``out`` whose mark no process holds (killed builds)."""
    if fcntl is None:  # no flock (Windows): a running build's open mark could not be told apart; leave them
        return
    for stale in out.parent.glob(glob.escape(out.name) + ".partial-*"):
        try:
            fd = os.open(stale / UNFINISHED, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:  # not one of our work directories, or not ours to remove
            continue
        try:
            free = try_lock(fd)  # held: that build is running
        finally:
            os.close(fd)
        if free:
            shutil.rmtree(stale, ignore_errors=True)


_LOCKS: dict[str, int] = {}  # work directory -> the open, locked descriptor of its mark


def replace_dir(work: Path, out: Path) -> None:
    """Swap the finished ``work`` into ``out``. An earlier artifact is renamed aside first and removed only
    after the swap; if the swap fails it is put back."""
    check_out_dir(out)  # again: something may have appeared there during the export
    old = swap_in(work, out)
    (out / UNFINISHED).unlink()  # only now: killed before this, ``out`` is refused, never loaded unchecked
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def swap_in(work: Path, out: Path) -> Path | None:
    """``work`` renamed to ``out``, an earlier ``out`` renamed aside first and put back if the swap fails (never a
    moment with neither); returns the earlier one's new name, for the caller to remove when it is done."""
    old = out.with_name(f"{out.name}.old-{int(time.time() * 1000)}") if out.exists() else None
    try:  # a signal between the two renames puts the earlier one back too
        if old is not None:
            out.rename(old)
        work.rename(out)
    except BaseException:
        if old is not None and old.exists() and not out.exists():
            old.rename(out)
        raise
    return old
