"""Where medusa-export keeps what it makes once per machine: the dequantized built-in model and the record of
where base models were loaded from (`exporter/model_loading.py`), self-distilled training shards, the compiled
attention kernel (`runtime/kernels`). ``$MEDUSA_EXPORT_CACHE``, default ``~/.cache/medusa-export``."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError


def cache_root() -> Path:
    """``$MEDUSA_EXPORT_CACHE`` (empty: unset, not the current directory; made absolute), else ``~/.cache/medusa-export``; an
    InputError naming the variable when it names something other than a directory, or a path that cannot become
    one (under a file: it failed only when first written, after a model had loaded)."""
    value = os.environ.get("MEDUSA_EXPORT_CACHE", "")
    if not value.strip():
        return Path.home() / ".cache" / "medusa-export"
    # absolute, ``~`` expanded: a Dockerfile's ENV takes "~/x" literally, and a relative path moved with the process's
    # working directory
    path = Path(os.path.abspath(os.path.expanduser(value)))
    if path.exists() and not path.is_dir():
        raise InputError(f"MEDUSA_EXPORT_CACHE={value[:120]!r} is not a directory: point it at one (it is made if "
                         f"missing), or unset it for ~/.cache/medusa-export")
    above = _nearest_existing(path)
    if above is not None and not above.is_dir():
        raise InputError(f"MEDUSA_EXPORT_CACHE={value[:120]!r} lies under {str(above)[:120]}, a file: point it at a "
                         f"directory, or unset it for ~/.cache/medusa-export")
    return path


def _nearest_existing(path: Path) -> Path | None:
    """The nearest entry above ``path`` that exists (None: none does, or the system cannot look it up)."""
    try:
        for above in Path(os.path.abspath(path)).parents:
            if above.exists():
                return above
    except OSError:  # a name too long to look up: whoever writes there names it
        return None
    return None
