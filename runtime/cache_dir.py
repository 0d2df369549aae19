"""Where medusa-export keeps what it makes once per machine: the dequantized built-in model and the record of
where base models were loaded from (`exporter/model_loading.py`), self-distilled training shards, the compiled
attention kernel (`runtime/kernels`). ``$MEDUSA_EXPORT_CACHE``, default ``~/.cache/medusa-export``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("MEDUSA_EXPORT_CACHE", Path.home() / ".cache" / "medusa-export"))
