"""Reading ``.npz`` files that come from outside (an artifact, a heads directory) without trusting them.

    arrays = read_arrays(path, {"tokens": (np.uint16, np.uint32), "lengths": np.int64})   # ValueError otherwise

Every member must be one of the named 1-D arrays, stored uncompressed, of an accepted dtype and no larger than its
member, and the members together no larger than the file: what reading allocates is bounded by the file's real size
(a forged header or central directory cannot ask for more). No pickles. Any failure is a ValueError saying what is
wrong; callers turn it into their one-line error.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

MAX_UNPACKED = 4 << 30  # bytes one array may take


def read_arrays(path: str | Path, dtypes: dict[str, object] | Callable[[str], object],
                max_items: int | None = None, max_total: int | None = None) -> dict[str, np.ndarray]:
    """The arrays of ``path`` by name. ``dtypes``: name -> accepted dtype or tuple of dtypes (or a function giving
    that, None for a name that may not appear). ``max_items``: the most items any member may declare, ``max_total``
    all members together, checked before anything is read (a sparse file is as large as it claims, yet costs
    nothing on disk)."""
    accepted = dtypes.get if isinstance(dtypes, dict) else dtypes
    path = Path(path)
    try:
        _check_members(path, accepted, max_items, max_total)
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 (an encrypted member's RuntimeError, a truncated file's EOFError, ...)
        raise ValueError(f"{type(e).__name__}: {e}") from None


def _check_members(path: Path, accepted: Callable[[str], object], max_items: int | None,
                   max_total: int | None) -> None:
    size, total = path.stat().st_size, 0
    with zipfile.ZipFile(path) as z:
        members = z.infolist()
        if sum(m.file_size for m in members) > size:  # the directory's sizes are not the bytes the file holds
            raise ValueError("its members claim more bytes than the file holds")
        for m in members:
            name = m.filename.removesuffix(".npy")
            kinds = accepted(name) if m.filename.endswith(".npy") else None
            if kinds is None:
                raise ValueError(f"it holds another member ({m.filename!r:.40})")
            kinds = tuple(np.dtype(k) for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
            if m.compress_type != zipfile.ZIP_STORED or m.file_size > MAX_UNPACKED:
                raise ValueError(f"{m.filename} is compressed or too large")
            with z.open(m) as f:
                version = np.lib.format.read_magic(f)
                shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0) else
                                   np.lib.format.read_array_header_2_0(f))
                if len(shape) != 1 or dtype not in kinds or shape[0] * dtype.itemsize > m.file_size:
                    raise ValueError(f"{m.filename} is not a 1-D {'/'.join(k.name for k in kinds)} array of its size")
                if max_items is not None and shape[0] > max_items:
                    raise ValueError(f"{m.filename} holds {shape[0]} items, more than the {max_items} expected")
                total += shape[0]
                if max_total is not None and total > max_total:
                    raise ValueError(f"its members hold more than the {max_total} items expected in all")
