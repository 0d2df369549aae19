"""A session wrapper that knows the future: it replaces the heads' guesses with the true greedy tokens.

Used to drive decoding through paths that real (random) heads would rarely take: long accepted prefixes,
non-first children (so `keep` must move rows), or no accepted guess at all."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from conftest import TINY_VOCAB

from medusa_export.runtime.backends.base import Session


class OracleSession(Session):
    """Head k at position t proposes token t+2+k of ``full``, at rank ``rank`` of each head's list.
    ``wrong`` makes every guess a token that is never right instead; `accepted_rows` records `keep`."""

    def __init__(self, inner: Session, full: list[int], rank: int = 0, wrong: bool = False,
                 vocab_size: int = TINY_VOCAB) -> None:
        self.inner, self.full, self.rank, self.wrong, self.vocab_size = inner, full, rank, wrong, vocab_size
        self.accepted_rows: list[list[int]] = []

    capacity = property(lambda self: self.inner.capacity)
    length = property(lambda self: self.inner.length)

    def run(self, input_ids, position_ids, tree_mask, medusa, temperature, out_rows=None):
        out = self.inner.run(input_ids, position_ids, tree_mask, medusa, temperature)  # every row (`Session.run`)
        if out.medusa_ids is None:  # a vanilla step: nothing to rewrite
            return out
        ids = out.medusa_ids.copy()
        _, k_heads, r = ids.shape
        for i, pos in enumerate(np.asarray(position_ids).tolist()):
            for k in range(k_heads):
                j = pos + 2 + k
                true = self.full[j] if j < len(self.full) else 0
                others = [int(x) for x in ids[i, k] if x != true][: r - 1]
                if self.wrong:
                    never = next(t % self.vocab_size for t in range(true + 1, true + r + 2)
                                 if t % self.vocab_size not in others and t % self.vocab_size != true)
                    ids[i, k] = others + [never]
                else:
                    ids[i, k] = others[: self.rank] + [true] + others[self.rank:]
        return replace(out, medusa_ids=ids)

    def keep(self, rows):
        self.accepted_rows.append(list(np.asarray(rows).tolist()))
        self.inner.keep(rows)
