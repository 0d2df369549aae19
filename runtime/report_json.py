"""The text of a command's JSON report (`bench --json`, `verify --json`, `calibrate-tree --out`): strict JSON.

    write_json_report(path, report)   # strict JSON, written whole (`whole_file.write_report`)

Python's ``json.dumps`` writes NaN and infinity as the bare words ``NaN`` and ``Infinity``, which no strict JSON
reader (``jq``, JavaScript's ``JSON.parse``, most other languages) accepts: a figure that is not a finite number
was not measured, and is written as null.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def finite_or_none(value: Any) -> Any:
    """``value`` with every float that is NaN or infinite, in any dict, list or tuple within it, made None; numpy
    scalars and arrays as the Python numbers and lists they hold (``json`` refused a float32 or an int64)."""
    import numpy as np

    if isinstance(value, (np.generic, np.ndarray)):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k.item() if isinstance(k, np.generic) else k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def report_text(report: Any) -> str:
    """``report`` as indented strict JSON with a final newline (non-finite floats as null)."""
    return json.dumps(finite_or_none(report), indent=2, allow_nan=False) + "\n"


def write_json_report(path: Path, report: Any, make_parents: bool = False) -> None:
    """``report`` written whole to ``path`` as strict JSON (`whole_file.write_report`: nothing half-written, and with
    ``make_parents`` no directory left behind when the write fails)."""
    from .whole_file import write_report

    write_report(path, report_text(report), make_parents=make_parents)
