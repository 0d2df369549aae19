"""Drafts from the context (prompt lookup): what followed the last n-gram when it occurred earlier.

    index = ContextIndex(prompt_ids)          # the prompt, then every token the answer makes final
    index.extend([root])
    draft = index.propose(5)                  # Draft(tokens=[...], ngram=3), or None when nothing matches

Answers often repeat their prompt (names, code, quoted text) or themselves (lists, formats). The longest suffix
of the sequence (``max_ngram`` tokens down to ``min_ngram``) that occurred before is looked up, and the tokens that
followed its most recent earlier occurrence become a chain of candidates, verified in the same step as the
Medusa heads' candidates (`step_tree.py`). Verification keeps only what greedy decoding would have produced, so
drafts change speed, never tokens. No model, no training: it works for artifacts without heads too.

Lookup is O(1) per token: each n-gram maps to the position after its latest occurrence; the n-gram that ends
the sequence is registered only when the next token arrives, so a lookup never finds the suffix itself.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_NGRAM = 3
DEFAULT_MIN_NGRAM = 1
DEFAULT_MAX_DRAFT = 8


@dataclass(frozen=True)
class Draft:
    tokens: list[int]  # candidates for the tokens after the sequence's last one
    ngram: int  # length of the matched suffix (longer matches are accepted more often)
    kind: int | None = None  # acceptance-rate class (`speculation.AcceptanceRates`); None: ``ngram`` (the context's)

    @property
    def rate_kind(self) -> int:
        return self.ngram if self.kind is None else self.kind


class ContextIndex:
    def __init__(self, tokens: list[int] = (), max_ngram: int = DEFAULT_MAX_NGRAM,
                 min_ngram: int = DEFAULT_MIN_NGRAM) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram sizes need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.tokens: list[int] = []
        self.after: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after its latest occurrence
        self.extend(tokens)

    def extend(self, tokens) -> None:
        """Append tokens (the sequence's, in order)."""
        seq, after = self.tokens, self.after
        for t in tokens:
            i = len(seq)
            for n in range(self.min_ngram, min(self.max_ngram, i) + 1):
                after[tuple(seq[i - n:i])] = i
            seq.append(int(t))

    def propose(self, max_tokens: int) -> Draft | None:
        """Up to ``max_tokens`` tokens that followed the longest matching suffix, or None."""
        seq = self.tokens
        if max_tokens < 1:
            return None
        for n in range(min(self.max_ngram, len(seq)), self.min_ngram - 1, -1):
            start = self.after.get(tuple(seq[len(seq) - n:]))
            if start is not None:
                return Draft(seq[start:start + max_tokens], n)
        return None
