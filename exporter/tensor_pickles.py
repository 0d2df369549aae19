"""Reading PyTorch pickles of tensors without ever unpickling anything else.

    obj = load_tensors(path)          # torch.load(weights_only=True), warnings silenced
    # PickledObjects: the file holds objects other than tensors (refused: unpickling them could run code)
    # UnreadableTensors(reason): corrupt, truncated, or a file of another kind

torch words both refusals alike, and its message goes on to advise ``weights_only=False``, which must never be
followed for a file someone else made: callers word their own one-line errors from these two cases.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch

from medusa_export.runtime.errors import first_line


class PickledObjects(Exception):
    """The file holds pickled objects other than tensors and containers of them."""


class UnreadableTensors(Exception):
    """The file is not a readable PyTorch pickle (the one-line reason is the message)."""


def load_tensors(path: Path):
    """What ``path`` holds, loaded with ``weights_only=True``; PickledObjects or UnreadableTensors otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" in str(e).lower():  # torch names the disallowed GLOBAL: an object other than tensors
            raise PickledObjects() from None
        raise UnreadableTensors("corrupt, or not a PyTorch file") from None
    except Exception as e:  # a truncated zip, another kind of file, ...
        raise UnreadableTensors(f"{type(e).__name__}: {first_line(e, 120)}") from None
