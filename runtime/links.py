"""Symbolic links followed alike on every Python this package supports.

Python 3.13 changed ``Path.resolve()``: a loop of links is no longer an error in its default (non-strict) mode, it
comes back as a path that names the loop. Reading or writing through such a path then fails later, or replaces a
link with a file, instead of being refused where the path is checked.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def follow_links(path: str | Path) -> Path:
    """``path`` made absolute with its links followed, as ``Path.resolve()`` does (what cannot be followed, a missing
    file or a component that is a file, kept as written); OSError with errno ELOOP for a loop of links, on Python
    3.13 as before it."""
    path = Path(path)
    try:
        return path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13: "Symlink loop from ..."
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path)) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise
        return path.resolve()  # not there, under a file, not searchable: as far as it goes, for the caller to name
