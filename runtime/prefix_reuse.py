"""Prefix reuse: a request starts from the KV rows a finished request left in its slot, for the tokens they share.

    prefixes = SlotPrefixes(slots=8, enabled=backend.reuses_rows)
    slot, rows = prefixes.take(free_slots, prompt_ids, allowed=True)   # rows: prompt tokens already in that slot
    ...
    prefixes.release(slot, tokens_in_its_cache)                          # None: its rows are not to be trusted

A finished sequence's slot still holds the KV rows of its prompt and answer. A chat's next turn repeats them (the
conversation so far), and requests of one service share a system prompt: taking the slot whose rows share the
longest prefix with the new prompt skips that much prefill (about 1.3 ms a token for the default model on two
cores). Exact on backends whose KV rows depend on their tokens alone (`Backend.reuses_rows`): the answer is the one
a fresh prefill gives, bit for bit (tests/test_prefix_reuse.py).
"""

from __future__ import annotations

import numpy as np


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` have in common."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n], np.int64) != np.asarray(b[:n], np.int64))
    return int(differ[0]) if differ.size else n


class SlotPrefixes:
    """The token ids whose KV rows each free slot still holds, and which slot a new request takes."""

    def __init__(self, slots: int, enabled: bool) -> None:
        self.enabled = enabled
        self.tokens: list[list[int]] = [[] for _ in range(slots)]
        self.freed = [0] * slots  # when each slot was last freed (a counter): the longest unused is overwritten first
        self.clock = 0

    def release(self, slot: int, tokens: list[int] | None) -> None:
        """``slot`` is free again, holding the rows of ``tokens`` (None: a failed step may have half-written them)."""
        self.clock += 1
        self.freed[slot] = self.clock
        self.tokens[slot] = list(tokens) if tokens is not None and self.enabled else []

    def take(self, free: list[int], prompt: list[int], allowed: bool = True) -> tuple[int, int]:
        """Remove from ``free`` the slot a request with ``prompt`` takes; with it, how many of the prompt's tokens its
        rows already hold. The longest shared prefix wins (at most all but the prompt's last token: its row gives the
        first answer token); without one, the slot unused longest. ``allowed``: False for a request that needs every
        prompt row computed (`prompt_logprobs` scores each). Among slots sharing as much, the one unused longest: the
        others (a chat whose turn just ended, beyond a system prompt they all share) stay for their next request."""
        best, rows = min(free, key=lambda s: self.freed[s]), 0
        if self.enabled and allowed:
            for slot in free:
                n = min(shared_prefix(self.tokens[slot], prompt), len(prompt) - 1)
                if n > rows or n == rows and n > 0 and self.freed[slot] < self.freed[best]:
                    best, rows = slot, n
        free.remove(best)
        self.tokens[best] = []  # the request takes it over: its rows change from now on
        return best, rows
