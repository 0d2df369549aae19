"""Where `train-heads` writes, checked before the distillation: `--out` is new, empty or this mode's own earlier
output; no input (the model, the prompts) lies where the run writes or deletes; Medusa-2's work directory
OUT.partial is its own; one run at a time holds --out. No torch here, so the CLI checks before the long work.

    check_train_out_dir(Path("heads/mine"), "medusa1", train_inputs(model, data, exclude_eval))
    with train_out_lock(Path("heads/mine")):         # a second run on the same --out: InputError; a killed run's
        ... train, write ...                         # marked stage is moved in first (`finish_stage`)
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from medusa_export.runtime.errors import InputError
from medusa_export.runtime.typed_json import json_object_or_none

from .output_dir import (PROBE_PREFIX, artifact_holding, check_can_create, check_dir_path, check_replaceable, resolved,
                         try_lock, within)

# What train-heads writes (exporter/heads.py HEADS_FORMAT, exporter/training/checkpoint.py FILE; no torch here).
HEADS_FORMAT = "medusa-export-heads"
CHECKPOINT_FILES = {"checkpoint.pt", "checkpoint.tmp"}
# The lock a running train-heads holds in --out (`train_out_lock`); left behind only by a killed run, and then ours.
TRAIN_LOCK = ".train-heads.lock"
# Medusa-1's new files, in OUT until all are written (exporter/training/heads_outputs.py), then marked done and moved
# in; a run killed while moving them leaves the mark, and the next run on OUT finishes the move (`finish_stage`)
TRAIN_STAGE = ".train-heads.staging"
STAGE_DONE = ".done"  # in TRAIN_STAGE: every new file is there; its JSON lists the earlier files to remove
HEADS_MARK = "config.json"  # what makes OUT a heads directory: removed first and moved in last
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
    if mode == "medusa2":  # replaced whole by OUT.partial: "." would be the current directory, ".." no sibling's
        check_replaceable(out, "train-heads --mode medusa2")
    elif not str(out).isprintable():  # as build's: the name goes into training.json and every line naming it
        raise InputError(f"--out {str(out)!r:.120} holds a character that does not print (a newline, a control "
                         f"character): give a plain directory name")
    check_dir_path(out, "--out")
    _check_not_in_artifact(out)
    _check_train_inputs(out, mode, inputs or {})
    if cache_dir is not None and str(cache_dir).strip():
        _check_cache_dir(out, mode, Path(cache_dir), (inputs or {}).get("MODEL"))
    if mode == "medusa2":  # it writes OUT.partial beside OUT, then swaps it in
        check_can_create(out, "--out")
        _check_work_dir(out)
    # Our lock, and another rank's writability probe of this same check (torchrun: every rank checks at once)
    if not out.exists() or not any(p.name != TRAIN_LOCK and not p.name.startswith(PROBE_PREFIX)
                                   for p in out.iterdir()):
        return
    own = _is_heads_dir(out) if mode == "medusa1" else _is_medusa2_dir(out)
    if not own:
        kind = "heads directory" if mode == "medusa1" else "Medusa-2 model directory"
        raise InputError(f"--out {out} is not empty and not a {kind} written by train-heads: refusing to overwrite "
                         f"it; choose a new or empty directory")


def _check_not_in_artifact(out: Path) -> None:
    """An artifact's files are listed with their sizes and hashes in its manifest: heads written into its heads/
    folder (which looks like a heads directory of ours) left an artifact that no longer loads."""
    if (above := artifact_holding(out, itself=True)) is not None:
        raise InputError(f"--out {out} lies inside the artifact {above}, whose files its manifest lists: "
                         f"choose a directory outside it (then `medusa-export build --heads DIR`)")


def _check_train_inputs(out: Path, mode: str, inputs: dict) -> None:
    """Medusa-1 writes its files into OUT: an input that is one of them (or under one) would be overwritten
    (``--data OUT/heldout_prompts.jsonl``); Medusa-2 replaces OUT and removes OUT.partial whole: any input inside
    either would be deleted. OUT itself is never an input (MODEL == OUT)."""
    target = resolved(out)
    if target is None:
        return
    if mode == "medusa2":
        doomed = [target, resolved(partial_dir(out)) or target]
    else:
        doomed = [r for r in (resolved(out / name) for name in sorted(MEDUSA1_WRITES)) if r is not None]
    for flag, given in inputs.items():
        if given is None or not str(given).strip():
            continue
        source = resolved(given)
        if source is None:
            continue
        if source == target:
            raise InputError(f"--out {out} is {flag} {given}, which train-heads reads: it would be overwritten; "
                             f"choose another --out")
        hit = next((d for d in doomed if within(source, d)), None)
        if hit is not None:
            what = "replaces" if mode == "medusa2" else "overwrites"
            raise InputError(f"--out {out}: {flag} {given} lies where train-heads --mode {mode} {what} ({hit}): move "
                             f"it out of there, or choose another --out")


def _check_cache_dir(out: Path, mode: str, cache_dir: Path, model) -> None:
    """The self-distilled shards go into neither the output (replaced, or its files mixed with them) nor the model
    directory (an input, never written)."""
    cache = resolved(cache_dir)
    if cache is None:
        return
    places = [("--out", out, resolved(out))]
    if mode == "medusa2":
        partial = partial_dir(out)
        places.append(("--out's work directory", partial, resolved(partial)))
    if model is not None and str(model).strip():
        places.append(("MODEL", model, resolved(model)))
    for flag, given, where in places:
        if where is not None and within(cache, where):
            raise InputError(f"--cache-dir {cache_dir} is or lies inside {flag} {given}: give a cache directory "
                             f"outside it")


def _check_work_dir(out: Path) -> None:
    """OUT.partial is reused (resumed) or removed (--no-resume) only when train-heads made it (its mark is there)."""
    work = partial_dir(out)
    if not os.path.lexists(work):
        return
    if work.is_symlink() or not work.is_dir() or not (work / TRAIN_WORK_MARK).is_file():
        raise InputError(f"{work} is in the way of --out {out}: train-heads --mode medusa2 works in that directory, "
                         f"and this one is not its own: remove or rename it, or choose another --out")


def train_work_dir(out: Path, fresh: bool) -> Path:
    """Medusa-2's work directory OUT.partial, marked as ours: made here, or our earlier one (kept to resume, or
    removed and made anew when ``fresh``). Anything else at that name is refused (InputError), never taken."""
    _check_work_dir(out)
    work = partial_dir(out)
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / TRAIN_WORK_MARK).touch()
    return work


def _is_heads_dir(out: Path) -> bool:
    """train-heads' heads (config.json of our heads format), an interrupted run (its checkpoint and nothing else),
    or a run killed while it moved its finished files in (its stage marked done: the next run finishes the move)."""
    if not (out / TRAIN_STAGE).is_symlink() and (out / TRAIN_STAGE / STAGE_DONE).is_file():
        return True
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
        if not try_lock(fd):
            os.close(fd)
            raise InputError(f"another train-heads is writing {out}: wait for it or choose another --out")
        if _same_file(fd, path):
            break
        os.close(fd)
    else:
        raise InputError(f"another train-heads is writing {out}: wait for it or choose another --out")
    _TRAIN_LOCKS[key] = fd
    try:
        finish_stage(out)  # a run killed while it moved its files in: finish that (all new) or drop it (all old)
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


def commit_stage(out: Path, remove: list[str]) -> None:
    """Mark OUT/TRAIN_STAGE complete (its files flushed to disk first), then move its files into ``out`` and remove
    ``remove`` there (`finish_stage`). From the mark on, a run killed at any point leaves the mark, and the next
    run on ``out`` finishes the move: the outcome is the earlier set or the new one, never a mix."""
    stage = out / TRAIN_STAGE
    try:
        for p in stage.iterdir():
            _flush(p)
        tmp = stage / (STAGE_DONE + ".tmp")
        tmp.write_text(json.dumps(sorted(remove)) + "\n")
        _flush(tmp)
        tmp.replace(stage / STAGE_DONE)
    except BaseException:  # not marked: the earlier set stays, and so must nothing of this one
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _flush(stage)
    finish_stage(out)


def finish_stage(out: Path) -> None:
    """Complete or drop a Medusa-1 stage in ``out``: marked done, its files are moved in (the heads mark,
    config.json, taken away first and put back last, so that no reader loads the old and new files mixed) and the
    listed earlier files removed; not marked, the stage is a run that died while writing it: removed, the earlier
    files untouched. Safe to repeat after a kill at any point."""
    stage = out / TRAIN_STAGE
    if not stage.is_dir() or stage.is_symlink():
        return
    done = stage / STAGE_DONE
    if not done.is_file():
        shutil.rmtree(stage, ignore_errors=True)
        return
    if (stage / HEADS_MARK).exists():  # not moved in yet: the earlier one goes first
        (out / HEADS_MARK).unlink(missing_ok=True)
    for p in sorted(stage.iterdir()):
        if p.name not in (HEADS_MARK, STAGE_DONE, STAGE_DONE + ".tmp"):
            p.replace(out / p.name)
    for name in _listed_names(done):  # none of them is in the new set: removing one twice is harmless
        (out / name).unlink(missing_ok=True)
    if (stage / HEADS_MARK).exists():
        (stage / HEADS_MARK).replace(out / HEADS_MARK)
    done.unlink()
    shutil.rmtree(stage, ignore_errors=True)


def _listed_names(done: Path) -> list[str]:
    """The earlier files a done mark lists for removal: plain names only (nothing outside OUT), none of ours."""
    try:
        names = json.loads(done.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(names, list):
        return []
    return [n for n in names if isinstance(n, str) and n in MEDUSA1_WRITES and n != HEADS_MARK]


def _flush(path: Path) -> None:
    """Write ``path`` (a file, or a directory's entries) through to disk, where the system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # Windows: no fsync of a directory or a file opened to read
        pass
    finally:
        os.close(fd)


def partial_dir(out: Path) -> Path:
    """Medusa-2's work directory beside ``out``, swapped in when the run is done."""
    return out.with_name(out.name + ".partial")


def check_train_arguments(model, data, out_dir, options: dict) -> None:
    """InputError for a library caller's argument of the wrong type (`train_heads`, `train_medusa2`), before any
    work: they failed inside as an AttributeError or a TypeError. ``options``: name -> (value, the class it needs)."""
    for name, value in (("data_file", data), ("out_dir", out_dir)):
        if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
            raise InputError(f"{name} must be a non-empty path, got {value!r:.60}")
    loaded = all(hasattr(model, a) for a in ("model", "tokenizer", "identity"))
    if not (model is None or isinstance(model, (str, os.PathLike)) or loaded):
        raise InputError(f"model_source must be a model directory or .gguf file, None for the built-in model, or a "
                         f"loaded model (load_base_model), got {type(model).__name__:.40}")
    for name, (value, kind) in options.items():
        if not isinstance(value, kind):
            raise InputError(f"{name} must be a {kind.__name__}, got {type(value).__name__:.40}: pass "
                             f"{kind.__name__}(...)")


def train_inputs(model, data, exclude_eval, init_heads=None) -> dict:
    """The paths a train-heads run reads, by the flag that names them (`check_train_out_dir`'s ``inputs``): MODEL
    when it is a path (not a loaded model or the built-in one), --data unless it is the packaged "sharegpt"."""
    return {"MODEL": model if isinstance(model, (str, os.PathLike)) else None,
            "--data": None if str(data) == "sharegpt" else data, "--exclude-eval": exclude_eval,
            "--init-heads": init_heads}
