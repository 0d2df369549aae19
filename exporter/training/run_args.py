"""A Medusa-1 run's arguments: what its checkpoint's resume key covers, and what training.json records of them.

    args = run_arguments(data_file, out_dir, options)   # plain values, paths as typed
    key = resume_key(args, data_sha, train_ex, world, identity)
    record = recorded_args(args)                        # no absolute paths of this machine
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from medusa_export.exporter.provenance import portable_command, portable_path
from medusa_export.runtime.training_options import Medusa1Options

from .data import model_identity

_PATH_ARGS = ("data_file", "out_dir", "cache_dir", "exclude_eval")

# Options that change how fast or where a run goes, never the heads it writes (the answers come from the cache,
# which is keyed without them too): a resume may change them.
_NOT_IN_RESUME_KEY = ("device", "threads", "progress", "data_file", "exclude_eval", "gen_batch_size", "distill_engine")


def resume_key(args: dict, data_sha: str, train_ex, world: int, identity: dict) -> dict:
    """What a checkpoint must match to be continued: the options that change the result, the prompts trained on
    (their hash covers --data and --exclude-eval, so the paths as typed are left out: ``./p.jsonl`` is
    ``p.jsonl``), the answers distilled from them (a cache made again can hold others), and the base model's
    fingerprint (heads half trained on another model must not continue)."""
    kept = {k: v for k, v in args.items() if k not in _NOT_IN_RESUME_KEY}
    model = identity.get("sha256_16") or model_identity(identity)
    answers = hashlib.sha256(np.ascontiguousarray(train_ex.targets).tobytes()).hexdigest()[:16]
    return {**kept, "data_sha256": data_sha, "positions": len(train_ex), "answers": answers, "world": world,
            "model": model}


def run_arguments(data_file: str | Path, out_dir: str | Path, o: Medusa1Options) -> dict:
    """The run's arguments as plain values (paths as typed): what the checkpoint fingerprint covers."""
    args = {"data_file": data_file, "out_dir": out_dir, **asdict(o)}
    return {k: str(v) if isinstance(v, Path) else v for k, v in args.items()}


def recorded_args(args: dict) -> dict:
    """What training.json records: no absolute paths of this machine (the record ships with the heads)."""
    return {k: portable_path(v) if k in _PATH_ARGS and v is not None else v for k, v in args.items()}


def command_line() -> str:
    """The command as typed; ``python -m medusa_export.runtime.cli`` (also what torchrun runs) for the module's
    path, which would name this machine's install."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).parts[-2:] == ("cli", "__main__.py"):
        argv[0] = "python -m medusa_export.runtime.cli"
    return portable_command(argv)
