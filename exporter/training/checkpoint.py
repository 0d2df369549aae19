"""Resumable training state in ``out_dir/checkpoint.pt``: heads, optimizer, scheduler, position in the run.

Saved atomically, with the settings it was made under; loaded only when its fingerprint (the run's arguments,
data and base model) matches. A checkpoint of this OUT made under other settings is a one-line CheckpointError
naming the options that differ (``load``): neither mixed into this run nor silently replaced by a fresh one. A matching checkpoint whose contents do not
fit the run (a position past its steps, heads or optimizer state of other shapes, NaN weights) is a
CheckpointError too (``restore``), never a traceback or heads trained from garbage. A checkpoint that cannot be read is an error
naming the file and ``--no-resume``, never a silent restart. Read back with ``weights_only=True``: plain
tensors and numbers, never arbitrary pickled objects. Removed once the run has written its final heads.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from medusa_export.runtime.generation_config import is_int
from medusa_export.runtime.errors import CheckpointError, first_line

from ..tensor_pickles import PickledObjects, UnreadableTensors, load_tensors

FILE = "checkpoint.pt"
_SKIP = ("resume", "progress", "threads", "checkpoint_every_s", "out_dir", "cache_dir")


def path(out: Path) -> Path:
    return Path(out) / FILE


# What a key's entry is called in an error (the rest: ``--`` and the name with dashes)
_NAMES = {"data_sha256": "the prompts (--data, --exclude-eval, --later-turns)", "model": "the base model",
          "positions": "the number of training positions", "answers": "the distilled answers",
          "world": "the number of processes", "train_sequences": "the number of training sequences",
          "warmup": "the warm-up heads (--init-heads)", "heads_lr": "--lr", "warmup_epochs": "--epochs"}


def _kept(args: dict) -> dict:
    return {k: v for k, v in args.items() if k not in _SKIP}


def fingerprint(args: dict) -> str:
    """What must match for a checkpoint to continue (not the knobs that do not change the result)."""
    return hashlib.sha256(json.dumps(_kept(args), sort_keys=True, default=str).encode()).hexdigest()[:16]


def key_text(args: dict) -> str:
    """The settings a checkpoint is saved with (JSON), so that a mismatch can name what changed."""
    return json.dumps(_kept(args), sort_keys=True, default=str)


def changed(saved: str, args: dict) -> list[str]:
    """``--lr 0.01 (now 0.02)`` for every setting of ``args`` that differs from the ``saved`` ``key_text``."""
    try:
        old = json.loads(saved)
    except ValueError:
        old = None
    if not isinstance(old, dict):
        return []
    new = json.loads(key_text(args))
    return [f"{_NAMES.get(k, '--' + k.replace('_', '-'))} {_show(old.get(k))} (now {_show(new.get(k))})"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _show(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def save(out: Path, fp: str, heads, opt, sched, epoch: int, step_in_epoch: int, history: dict,
         extra: dict | None = None, key: dict | None = None) -> None:
    """``extra``: further tensors to keep (Medusa-2 adds its trainable backbone weights); ``key``: the settings
    ``fp`` was made from (``fingerprint(key)``), kept so that a rerun with other ones is told which."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {"fingerprint": fp, "key": key_text(key) if key is not None else "", "epoch": epoch,
             "step_in_epoch": step_in_epoch, "history": json.dumps(history),
             "heads": heads.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             **(extra or {})}
    tmp = path(out).with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path(out))


def load(out: Path, fp: str, key: dict | None = None) -> dict | None:
    """The saved state of this run, or None (no checkpoint). CheckpointError when the file cannot be read, or
    when it is another run's (other settings, data or base model: ``refused``)."""
    p = path(out)
    if not p.exists():
        return None
    try:
        state = load_tensors(p)
        if not isinstance(state, dict) or not {"fingerprint", "heads", "optimizer", "scheduler"} <= set(state):
            raise UnreadableTensors("not a train-heads checkpoint")
    except PickledObjects:  # never unpickled: another program's file, or one with code in it
        raise CheckpointError(f"checkpoint {p} cannot be read (it holds objects other than tensors): delete it, or "
                              f"start afresh with --no-resume") from None
    except UnreadableTensors as e:  # a torn write, another program's file
        raise CheckpointError(f"checkpoint {p} cannot be read ({e}): delete it, or start afresh with "
                              f"--no-resume") from None
    if state["fingerprint"] != fp:
        raise refused(p, changed(state.get("key") if isinstance(state.get("key"), str) else "", key or {}))
    return state


def refused(p: Path, differences: list[str]) -> CheckpointError:
    """The one-line error for a checkpoint of a run under other settings: never continued (the heads would mix two
    runs), never silently replaced (hours of training lost to a typo)."""
    what = "; ".join(differences[:4]) + ("; ..." if len(differences) > 4 else "") if differences else \
        "other arguments, data or base model"
    return CheckpointError(f"checkpoint {p} is of a run with other settings ({what}): rerun with its settings to "
                           f"continue it, or delete it (or pass --no-resume) to start afresh")


def remove(out: Path) -> None:
    path(out).unlink(missing_ok=True)


def damaged(out: Path, why: str) -> CheckpointError:
    """The one-line error for a checkpoint of this run whose contents are unusable."""
    return CheckpointError(f"checkpoint {path(out)} is damaged ({why}): delete it to start afresh, or rerun with "
                           f"--no-resume")


def restore(out: Path, state: dict, heads, opt, sched, steps: Sequence[int]) -> tuple[int, int, dict]:
    """Load ``state`` into ``heads``, ``opt`` and ``sched``; return (epoch, step_in_epoch, history dict).
    ``steps``: the run's steps per epoch, which bound the saved position. CheckpointError (``damaged``) for
    contents that do not fit: torch would raise deep inside a step, or silently train from them."""
    epoch, step = _position(out, state, steps)
    history = _history(out, state.get("history"))
    _load_heads(out, heads, state["heads"])
    _load_optimizer(out, opt, state["optimizer"])
    _load_scheduler(out, sched, state["scheduler"], len(opt.param_groups))
    return epoch, step, history


def _position(out: Path, state: dict, steps: Sequence[int]) -> tuple[int, int]:
    epoch, step = state.get("epoch"), state.get("step_in_epoch")
    if not (is_int(epoch) and 0 <= epoch <= len(steps)):
        raise damaged(out, f"epoch {str(epoch)[:24]!r} is not a whole number from 0 to the run's {len(steps)}")
    last = steps[epoch] if epoch < len(steps) else 0  # a finished run's position is (epochs, 0)
    if not (is_int(step) and 0 <= step <= last):
        raise damaged(out, f"step {str(step)[:24]!r} is not a whole number from 0 to {last}")
    return epoch, step


def _history(out: Path, text) -> dict:
    try:
        history = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        history = None
    if not isinstance(history, dict):
        raise damaged(out, "its history is not a JSON object")
    return history


def _load_heads(out: Path, heads, saved) -> None:
    if not isinstance(saved, dict) or not all(hasattr(v, "dtype") for v in saved.values()):
        raise damaged(out, "its heads are not a table of tensors")
    if any(v.is_floating_point() and not bool(v.isfinite().all()) for v in saved.values()):
        raise damaged(out, "its heads hold NaN or infinite weights")
    try:
        heads.load_state_dict(saved)  # strict: missing or unexpected keys, other shapes
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise damaged(out, "its heads do not fit this run: " + first_line(e, 160)) from None


def _load_optimizer(out: Path, opt, saved) -> None:
    try:
        opt.load_state_dict(saved)
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise damaged(out, "its optimizer state does not fit this run: " + first_line(e, 160)) from None
    # load_state_dict checks the parameter counts only: a moment of another shape fails inside the next step
    for group in opt.param_groups:
        if not finite_number(group.get("lr")):
            raise damaged(out, "its optimizer's learning rate is not a finite number")
        for p in group["params"]:
            for name, value in opt.state.get(p, {}).items():
                if not hasattr(value, "shape") or (value.dim() > 0 and value.shape != p.shape):
                    raise damaged(out, f"its optimizer's {name} does not have the parameters' shapes")


def _load_scheduler(out: Path, sched, saved, groups: int) -> None:
    ok = (isinstance(saved, dict) and is_int(saved.get("last_epoch")) and saved["last_epoch"] >= 0
          and all(isinstance(saved.get(k), list) and len(saved[k]) == groups and all(map(finite_number, saved[k]))
                  for k in ("base_lrs", "_last_lr")))
    if not ok:
        raise damaged(out, "its scheduler state does not fit this run")
    try:
        sched.load_state_dict(saved)
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise damaged(out, "its scheduler state does not fit this run: " + first_line(e, 160)) from None


def finite_number(x) -> bool:
    """A real number (not a bool), neither NaN nor infinite."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
