"""Where commands write, checked before any long work: `build` replaces only a new directory, an empty one, or an
earlier medusa-export artifact; `train-heads` only a new or empty directory or its own earlier output; report
files (``--json``, ``--plot``, ``calibrate-tree --out``) go into a directory that exists and takes new files.

    check_out_dir(Path("artifacts/smollm2"))        # before any export work: InputError otherwise
    work = new_work_dir(out)                         # artifacts/smollm2.partial-XXXX, next to it
    ... write everything into work ...
    replace_dir(work, out)                           # the swap; the old artifact is removed only after it

    check_out_file(Path("bench.json"), "--json")      # not a directory, its directory exists and is writable
    check_train_out_dir(Path("heads/mine"), "medusa1")

A directory that holds anything but an artifact's own files (those its manifest lists) is never touched:
``build --out ~/work`` must not delete ``~/work``. No torch here, so the CLI checks before the long export.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so no abandoned work directory is ever removed
    fcntl = None
try:
    import msvcrt  # Windows: train-heads' lock on --out (a byte range lock, released with its process too)
except ImportError:
    msvcrt = None

from medusa_export.runtime.errors import InputError
from medusa_export.runtime.manifest import MANIFEST, UNFINISHED, building, listed_files
from medusa_export.runtime.typed_json import json_object_or_none


def check_out_dir(out: Path) -> None:
    """InputError (one line, naming the path) unless ``out`` may be replaced by a new artifact."""
    try:
        here = Path.cwd()
    except OSError:  # the current directory was removed: nothing to protect there
        here = None
    if here is not None and out.resolve() in (here, *here.parents):  # cwd() is resolved: compare like with like
        raise InputError(f"--out {out} is or holds the current directory, which build would replace whole: give "
                         f"another directory, or run the command from outside it")
    if not str(out).isprintable():  # the artifact's name goes into every later line that names it
        raise InputError(f"--out {str(out)!r:.120} holds a character that does not print (a newline, a control "
                         f"character): give a plain directory name")
    if out.name in ("", ".."):  # "ART/heads/..": the work directory made beside it would land inside it
        raise InputError(f"--out {out} does not name a directory by its own name: give it as "
                         f"{os.path.normpath(os.path.abspath(out))}")
    if out.is_symlink():
        raise InputError(f"--out {out} is a symbolic link: give a real directory path for the artifact")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is an existing file, not an artifact directory: choose another --out")
    try:
        real = out.resolve().parents
    except (OSError, RuntimeError):  # a loop of links: the checks below name what is wrong
        real = ()
    # an artifact inside another one (by its path as written, or through links) is a foreign folder of that one
    for above in dict.fromkeys([*Path(os.path.abspath(out)).parents, *real]):
        if (above / MANIFEST).is_file() and listed_files(above) is not None:
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


def _probe(directory: Path, flag: str, path: Path) -> None:
    """InputError unless an entry can be made in ``directory`` (made and removed again: nothing is left)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".medusa-export-probe-", dir=directory))
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
    (files, or directories such as the artifact) nor inside one. Called before the work whose result it holds."""
    _check_not_an_input(path, flag, inputs)
    if path.is_symlink():  # the report replaces the link's target: check that instead
        try:
            path = path.resolve(strict=False)
        except (RuntimeError, OSError):
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


def _check_not_an_input(path: Path, flag: str, inputs: tuple) -> None:
    """A report written over what the command reads would destroy it (a manifest, the prompts file)."""
    try:
        target = Path(path).resolve()
    except (OSError, RuntimeError):  # a symlink loop: the checks after this one name it
        return
    for given in inputs:
        if given is None or not str(given).strip():
            continue
        try:
            source = Path(given).resolve()
        except (OSError, RuntimeError):
            continue
        if target == source or source in target.parents:
            raise InputError(f"{flag} {path} would overwrite {'a file in ' if target != source else ''}{given}, "
                             f"which this command reads (or writes too): choose another path")


# What train-heads writes (exporter/heads.py HEADS_FORMAT, exporter/training/checkpoint.py FILE; no torch here).
HEADS_FORMAT = "medusa-export-heads"
CHECKPOINT_FILES = {"checkpoint.pt", "checkpoint.tmp"}
# The lock a running train-heads holds in --out (`train_out_lock`); left behind only by a killed run, and then ours.
TRAIN_LOCK = ".train-heads.lock"
TRAIN_STAGE = ".train-heads.staging"  # Medusa-1's new files until all are written (exporter/training/train.py)
# The mark of Medusa-2's work directory OUT.partial (`train_work_dir`): only a directory holding it is reused.
TRAIN_WORK_MARK = ".train-heads-work"
# Everything Medusa-1 writes into --out (exporter/training/train.py, heads.py, own_answers.py, examples.py):
# an input under one of these names there would be overwritten. Medusa-2 replaces --out (and OUT.partial) whole.
MEDUSA1_WRITES = {"config.json", "heads.safetensors", "heads.safetensors.tmp", "eval.json", "draft_vocab.json",
                  "heldout_prompts.jsonl", "answers.npz", "training.json", *CHECKPOINT_FILES, TRAIN_LOCK}


def check_train_out_dir(out: Path, mode: str, inputs: dict | None = None, cache_dir: Path | None = None) -> None:
    """InputError unless `train-heads --mode MODE --out OUT` may write ``out``: a new or empty directory, or this
    mode's own earlier output (medusa1: a heads directory, or an interrupted run's checkpoint alone, which it
    resumes; medusa2: a Medusa-2 model directory, which it replaces whole, and OUT.partial absent or its own).
    ``inputs`` ({"MODEL": path, "--data": path, ...}, None values skipped): none may be what the run overwrites or
    deletes; ``cache_dir`` may not be, or lie inside, ``out`` or the model directory."""
    check_dir_path(out, "--out")
    _check_train_inputs(out, mode, inputs or {})
    if cache_dir is not None and str(cache_dir).strip():
        _check_cache_dir(out, mode, Path(cache_dir), (inputs or {}).get("MODEL"))
    if mode == "medusa2":  # it writes OUT.partial beside OUT, then swaps it in
        check_can_create(out, "--out")
        _check_work_dir(out)
    if not out.exists() or not any(p.name != TRAIN_LOCK for p in out.iterdir()):
        return
    own = _is_heads_dir(out) if mode == "medusa1" else _is_medusa2_dir(out)
    if not own:
        kind = "heads directory" if mode == "medusa1" else "Medusa-2 model directory"
        raise InputError(f"--out {out} is not empty and not a {kind} written by train-heads: refusing to overwrite "
                         f"it; choose a new or empty directory")


def _resolved(path) -> Path | None:
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):  # a loop of links: whoever opens it names the problem
        return None


def _within(path: Path, top: Path) -> bool:
    return path == top or top in path.parents


def _check_train_inputs(out: Path, mode: str, inputs: dict) -> None:
    """Medusa-1 writes its files into OUT: an input that is one of them (or under one) would be overwritten
    (``--data OUT/heldout_prompts.jsonl``); Medusa-2 replaces OUT and removes OUT.partial whole: any input inside
    either would be deleted. OUT itself is never an input (MODEL == OUT)."""
    target = _resolved(out)
    if target is None:
        return
    if mode == "medusa2":
        doomed = [target, _resolved(out.with_name(out.name + ".partial")) or target]
    else:
        doomed = [r for r in (_resolved(out / name) for name in sorted(MEDUSA1_WRITES)) if r is not None]
    for flag, given in inputs.items():
        if given is None or not str(given).strip():
            continue
        source = _resolved(given)
        if source is None:
            continue
        if source == target:
            raise InputError(f"--out {out} is {flag} {given}, which train-heads reads: it would be overwritten; "
                             f"choose another --out")
        hit = next((d for d in doomed if _within(source, d)), None)
        if hit is not None:
            what = "replaces" if mode == "medusa2" else "overwrites"
            raise InputError(f"--out {out}: {flag} {given} lies where train-heads --mode {mode} {what} ({hit}): move "
                             f"it out of there, or choose another --out")


def _check_cache_dir(out: Path, mode: str, cache_dir: Path, model) -> None:
    """The self-distilled shards go into neither the output (replaced, or its files mixed with them) nor the model
    directory (an input, never written)."""
    cache = _resolved(cache_dir)
    if cache is None:
        return
    places = [("--out", out, _resolved(out))]
    if mode == "medusa2":
        partial = out.with_name(out.name + ".partial")
        places.append(("--out's work directory", partial, _resolved(partial)))
    if model is not None and str(model).strip():
        places.append(("MODEL", model, _resolved(model)))
    for flag, given, where in places:
        if where is not None and _within(cache, where):
            raise InputError(f"--cache-dir {cache_dir} is or lies inside {flag} {given}: give a cache directory "
                             f"outside it")


def _check_work_dir(out: Path) -> None:
    """OUT.partial is reused (resumed) or removed (--no-resume) only when train-heads made it (its mark is there)."""
    work = out.with_name(out.name + ".partial")
    if not os.path.lexists(work):
        return
    if work.is_symlink() or not work.is_dir() or not (work / TRAIN_WORK_MARK).is_file():
        raise InputError(f"{work} is in the way of --out {out}: train-heads --mode medusa2 works in that directory, "
                         f"and this one is not its own: remove or rename it, or choose another --out")


def train_work_dir(out: Path, fresh: bool) -> Path:
    """Medusa-2's work directory OUT.partial, marked as ours: made here, or our earlier one (kept to resume, or
    removed and made anew when ``fresh``). Anything else at that name is refused (InputError), never taken."""
    _check_work_dir(out)
    work = out.with_name(out.name + ".partial")
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / TRAIN_WORK_MARK).touch()
    return work


def _is_heads_dir(out: Path) -> bool:
    """train-heads' heads (config.json of our heads format), or an interrupted run: its checkpoint and nothing else."""
    config = json_object_or_none(out / "config.json")
    if config is not None:
        return config.get("format") == HEADS_FORMAT
    return not (out / "config.json").exists() and {p.name for p in out.iterdir()} <= CHECKPOINT_FILES | {TRAIN_LOCK,
                                                                                                      TRAIN_STAGE}


def _is_medusa2_dir(out: Path) -> bool:
    """A model directory train-heads --mode medusa2 wrote: Medusa heads in config.json, mode in training.json."""
    config, record = json_object_or_none(out / "config.json"), json_object_or_none(out / "training.json")
    return bool(config and record and "medusa_num_heads" in config and record.get("mode") == "medusa2")


_TRAIN_LOCKS: dict[str, int] = {}  # --out (absolute) -> the open, locked descriptor of its lock file


def _rank_zero() -> bool:
    """Under torchrun every rank runs the command: rank 0 alone writes --out, so it alone holds the lock."""
    try:
        return int(os.environ.get("WORLD_SIZE") or 1) <= 1 or int(os.environ.get("RANK") or 0) == 0
    except ValueError:  # the trainer refuses such numbers in one line
        return True


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        elif msvcrt is not None:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


@contextmanager
def train_out_lock(out: Path):
    """Hold an advisory lock on ``out`` (its file TRAIN_LOCK, ``out`` made if missing) while train-heads writes it:
    a second run on the same --out is refused in one line. Re-entrant in a process; the lock file is removed at the
    end, and so is ``out`` when this made it and nothing else was written there."""
    out = Path(out)
    key = os.path.abspath(out)
    if key in _TRAIN_LOCKS or not _rank_zero():
        yield
        return
    made = not os.path.lexists(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / TRAIN_LOCK
    for _ in range(5):  # the file a finishing run removes after we opened it: open the new one
        fd = os.open(path, os.O_CREAT | os.O_RDWR | getattr(os, "O_NOFOLLOW", 0), 0o644)
        if not _try_lock(fd):
            os.close(fd)
            raise InputError(f"another train-heads is writing {out}: wait for it or choose another --out")
        if _same_file(fd, path):
            break
        os.close(fd)
    else:
        raise InputError(f"another train-heads is writing {out}: wait for it or choose another --out")
    _TRAIN_LOCKS[key] = fd
    try:
        yield
    finally:
        del _TRAIN_LOCKS[key]
        if _same_file(fd, path):  # not when Medusa-2 replaced ``out`` (and the file with it)
            try:
                path.unlink()
            except OSError:  # Windows: an open file stays; it is recognised as ours
                pass
        os.close(fd)
        if made:
            try:
                out.rmdir()  # only if empty: a run that failed before writing leaves no directory it made
            except OSError:
                pass


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except OSError:
        return False


def new_work_dir(out: Path) -> Path:
    """A directory beside ``out`` (same file system, so the final rename is atomic) marked unfinished, the mark
    locked by this process until `release_work_dir`. Work directories of earlier builds of ``out`` whose mark no
    process holds (killed builds) are removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    work = Path(tempfile.mkdtemp(prefix=out.name + ".partial-", dir=out.parent))
    work.chmod(0o755)
    fd = os.open(work / UNFINISHED, os.O_CREAT | os.O_RDWR, 0o644)
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a lock dies with its process: how a later build knows this one is gone
    _LOCKS[str(work)] = fd
    building(work, True)
    return work


def release_work_dir(work: Path) -> None:
    """This process no longer builds ``work`` (swapped into place, or removed after a failure)."""
    fd = _LOCKS.pop(str(work), None)
    if fd is not None:
        os.close(fd)
    building(work, False)


def _remove_abandoned(out: Path) -> None:
    if fcntl is None:  # no way to tell a killed build from a running one: leave them
        return
    for stale in out.parent.glob(glob.escape(out.name) + ".partial-*"):
        try:
            fd = os.open(stale / UNFINISHED, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:  # not one of our work directories, or not ours to remove
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: that build is running
            continue
        finally:
            os.close(fd)
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
