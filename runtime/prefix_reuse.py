"""Prefix reuse: a request starts from the KV rows a finished request left in its slot, for the tokens they share.

    prefixes = SlotPrefixes(slots=8, enabled=backend.reuses_rows)
    slot, rows = prefixes.take(free_slots, prompt_ids, allowed=True)   # rows: prompt tokens already in that slot
    ...
    prefixes.release(slot, tokens_in_its_cache)                          # None: its rows are not to be trusted
    donor, shared, ready = running_donor(prompt_ids, engine.running)      # or copy a running sequence's rows

A finished sequence's slot still holds the KV rows of its prompt and answer. A chat's next turn repeats them (the
conversation so far), and requests of one service share a system prompt: taking the slot whose rows share the
longest prefix with the new prompt skips that much prefill (about 1.3 ms a token for the default model on two
cores). A running sequence's rows serve too: a request copies them, or waits in the queue while that sequence's prompt
is still going in (a request's ``n`` choices, requests under one system prompt arriving together). Exact on backends
whose KV rows depend on their tokens alone (`Backend.reuses_rows`): the answer is the one a fresh prefill gives, bit
for bit (tests/test_prefix_reuse.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .engine_sequence import Sequence


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
        """`choose` and `claim` in one."""
        slot, rows = self.choose(free, prompt, allowed)
        self.claim(free, slot)
        return slot, rows

    def choose(self, free: list[int], prompt: list[int], allowed: bool = True) -> tuple[int, int]:
        """The slot of ``free`` a request with ``prompt`` would take, and how many of the prompt's tokens its rows
        already hold. The longest shared prefix wins (at most all but the prompt's last token: its row gives the
        first answer token); without one, the slot unused longest. ``allowed``: False for a request that needs every
        prompt row computed (`prompt_logprobs` scores each). Among slots sharing as much, the one unused longest: the
        others (a chat whose turn just ended, beyond a system prompt they all share) stay for their next request.
        Requests one at a time thus go round the slots, each of whose memory pages fill as they are used."""
        # Off: the lowest free slot, so that requests one at a time keep to the first slots' memory pages
        best, rows = (self._unused_longest(free) if self.enabled else min(free)), 0
        if self.enabled and allowed:
            for slot in free:
                n = min(shared_prefix(self.tokens[slot], prompt), len(prompt) - 1)
                if n > rows or n == rows and n > 0 and self.freed[slot] < self.freed[best]:
                    best, rows = slot, n
        return best, rows

    def _unused_longest(self, free: list[int]) -> int:
        return min(free, key=lambda s: self.freed[s])

    def claim(self, free: list[int], slot: int) -> None:
        """``slot`` leaves ``free`` for a request: its rows change from now on."""
        free.remove(slot)
        self.tokens[slot] = []

    def place(self, free: list[int], seq: Sequence, running: list[Sequence]) -> tuple[int, int, Sequence | None] | None:
        """Where ``seq`` starts, its slot claimed: (slot, prompt tokens whose rows it starts with, the running
        sequence to copy them from or None: the slot holds them). None: it should wait, as a running sequence's prompt
        going in will hold more of its prefix than any free slot does."""
        allowed = not seq.scoring_prompt
        slot, rows = self.choose(free, seq.prompt, allowed)
        donor, shared, ready = running_donor(seq.prompt, running) if self.enabled and allowed else (None, 0, False)
        if donor is not None and shared > rows:
            if not ready:
                return None
            slot, rows = self._unused_longest(free), shared  # its rows are copied: any slot will do
        else:
            donor = None
        self.claim(free, slot)
        return slot, rows, donor


# Fewest shared tokens worth taking from a running sequence: copying is cheap, but waiting for its prefill costs the
# new request at least a step, and every chat shares the template's opening (23 tokens for the default model).
MIN_SHARED_RUNNING = 32


def running_donor(prompt: list[int], running: list[Sequence]) -> tuple[Sequence | None, int, bool]:
    """The running (or just admitted) sequence whose rows share the longest prefix with ``prompt``, at least
    `MIN_SHARED_RUNNING` tokens and at most all but the prompt's last; how many; whether they are in its cache now
    (else its prompt is still going in and will hold them: worth waiting for, as a request's ``n`` choices and a burst
    of requests under one system prompt do). Waiting only pays for more rows than some running sequence holds now:
    on a tie the one holding them now serves (not one still prefilling, or scoring its prompt alone every other
    step)."""
    now_seq, now_most, later_seq, later_most = None, 0, None, 0
    for seq in running:
        shared = min(shared_prefix(seq.prompt + seq.made, prompt), len(prompt) - 1)
        held = seq.session.length if seq.session is not None else 0
        now = min(shared, held)
        later = min(shared, len(seq.prompt)) if seq.cursor is None else now  # a prompt going in: all of it
        if now > now_most:
            now_seq, now_most = seq, now
        if later > later_most:
            later_seq, later_most = seq, later
    if later_most > now_most and later_most >= MIN_SHARED_RUNNING:
        return later_seq, later_most, False
    return (now_seq, now_most, True) if now_most >= MIN_SHARED_RUNNING else (None, 0, False)
