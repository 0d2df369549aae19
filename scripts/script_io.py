"""Shared by the benchmark scripts: argument checks, one-line errors instead of tracebacks, whole strict JSON."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable


def _whole(text: str, low: int, why: str) -> int:
    """``text`` as an integer of at least ``low``; argparse's error (``why`` saying what it must be) otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value}: {why}")
    return value


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _whole(text, 1, "must be at least 1")


def non_negative(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _whole(text, 0, "must not be negative")


def finite(value):
    """``value`` with every NaN or infinity replaced by None (strict JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    """``obj`` as strict JSON, written whole: to a temporary file beside ``path``, then renamed over it."""
    path = Path(path)
    text = json.dumps(finite(obj), indent=indent, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_main(main: Callable[[], None]) -> None:
    """``main()``, with the project's input errors (a missing artifact, a bad prompts file) as one line and exit 2."""
    from medusa_export.runtime.errors import MedusaExportError

    try:
        main()
    except (MedusaExportError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
