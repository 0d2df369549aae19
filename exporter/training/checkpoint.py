"""Resumable training state in ``out_dir/checkpoint.pt``: heads, optimizer, scheduler, position in the run.

Saved atomically; loaded only when its fingerprint (the run's arguments and data) matches, so a changed
command starts afresh (and says so) instead of mixing runs. A checkpoint that cannot be read is an error
naming the file and ``--no-resume``, never a silent restart. Read back with ``weights_only=True``: plain
tensors and numbers, never arbitrary pickled objects. Removed once the run has written its final heads.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from medusa_export.runtime.errors import CheckpointError

from ..tensor_pickles import PickledObjects, UnreadableTensors, load_tensors

FILE = "checkpoint.pt"
_SKIP = ("resume", "progress", "threads", "checkpoint_every_s", "out_dir", "cache_dir")


def path(out: Path) -> Path:
    return Path(out) / FILE


def fingerprint(args: dict) -> str:
    """What must match for a checkpoint to continue (not the knobs that do not change the result)."""
    kept = {k: v for k, v in args.items() if k not in _SKIP}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save(out: Path, fp: str, heads, opt, sched, epoch: int, step_in_epoch: int, history: dict,
         extra: dict | None = None) -> None:
    """``extra``: further tensors to keep (Medusa-2 adds its trainable backbone weights)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {"fingerprint": fp, "epoch": epoch, "step_in_epoch": step_in_epoch, "history": json.dumps(history),
             "heads": heads.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             **(extra or {})}
    tmp = path(out).with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path(out))


def load(out: Path, fp: str, log=lambda _msg: None) -> dict | None:
    """The saved state of this run, or None (no checkpoint, or one from another run: logged). CheckpointError
    when the file cannot be read."""
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
        log(f"ignoring {p}: it belongs to a run with other arguments or data (starting afresh)")
        return None
    return state


def remove(out: Path) -> None:
    path(out).unlink(missing_ok=True)
