"""The batched-step contract every backend's lanes runner follows (`OrtLanes`, `TrtLanes`); `Engine` drives it.

    outs = backend.lanes.run([Lane(session_a, tokens_a, 1.0), None, Lane(session_b, tokens_b, 0.7)])
    outs[0].next_ids                    # [rows of lane 0, S] (its last ``Lane.outputs`` rows when set)
    backend.lanes.keep(session_a, np.arange(n))   # commit the first n of lane 0's new rows

Lane i is one sequence: its one-sequence `Session` (whose KV cache holds its past), a prompt chunk or its next
token and a chain of drafts (causal rows after the past), the temperature of its probabilities, and how many of its
last rows the caller reads. The runner stages the new KV rows in the session as a one-sequence run would, so
`keep` commits them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .base import Session

MAX_BUILD_LANES = 64  # the most lanes `build --max-num-seqs` makes (a loaded artifact may hold up to LIMITS' 1,024)


def more_lanes_fix(lanes: int, wanted: int) -> str:
    """The fix for asking ``wanted`` sequences of an artifact with ``lanes``: fewer, or a rebuild where one adds
    lanes (never past what `build` makes)."""
    rebuild = f", or rebuild with more (`medusa-export build --max-num-seqs {min(wanted, MAX_BUILD_LANES)}`)"
    return f"use at most {lanes}" + (rebuild if lanes < MAX_BUILD_LANES else "")


@dataclass
class Lane:
    session: Session  # the sequence's session; its committed rows are the past
    tokens: np.ndarray  # [t] int64, t >= 1, causal after the past
    temperature: float  # of this sequence's probabilities (1.0 for greedy)
    outputs: int | None = None  # outputs for its last this many rows (a prompt chunk: 1, or 0 before the last); None: all

    def first_output(self) -> int:
        """The first of its rows whose outputs the step returns."""
        rows = len(self.tokens)
        return rows - (rows if self.outputs is None else min(self.outputs, rows))


@dataclass
class LaneOutput:
    next_ids: np.ndarray  # [t, S]
    next_probs: np.ndarray  # [t, S]
    entropy: np.ndarray  # [t]


class LanesRunner(Protocol):
    lanes: int  # sequences one step takes

    def run(self, lanes: list[Lane | None]) -> list[LaneOutput | None]:
        """One step; ``lanes[i]`` is lane i's sequence (None: empty). One output per lane (None where empty)."""

    def keep(self, session: Session, rows: np.ndarray) -> None:
        """Commit the staged rows ``rows`` (increasing indices into its lane's rows) of ``session``."""
