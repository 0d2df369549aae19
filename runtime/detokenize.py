"""Incremental detokenization: text deltas for a growing token list at constant cost per token.

    detok = IncrementalDetokenizer(tokenizer.decode)
    for ids in accepted_chunks:
        print(detok.push(ids), end="")     # only text that can no longer change
    print(detok.flush(cut=True))            # what was held back (cut: less an unfinished character at the end)

Decoding the whole output again at every step costs O(n) per step, O(n^2) per answer. Here only a short
window is decoded: the tokens since the last emitted text plus a few before them, because a token's text
can depend on its left neighbours (a leading space, a multi-byte character split over byte tokens). The
window's text minus the text of its already-emitted part is the delta (the scheme vLLM and TGI use). A
delta ending in U+FFFD (an incomplete UTF-8 character) is held back until the next token completes it.
"""

from __future__ import annotations

from typing import Callable, Sequence

CONTEXT_TOKENS = 4  # tokens of left context decoded with the new ones


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # window start: context tokens whose text was emitted already
        self.read = 0  # tokens up to here have their text emitted

    def push(self, ids: Sequence[int]) -> str:
        """Append tokens; return the new text that is final."""
        self.ids.extend(int(i) for i in ids)
        if self.read == len(self.ids):
            return ""
        shown = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        if len(text) <= len(shown) or text.endswith("\ufffd"):
            return ""  # nothing visible yet, or the last character is unfinished: wait for more tokens
        self.read = len(self.ids)
        self.prefix = max(self.prefix, self.read - CONTEXT_TOKENS)
        return text[len(shown):]

    def flush(self, cut: bool = False) -> str:
        """The held-back text at the end of a generation; with ``cut`` (the token budget ended it), less an
        unfinished character at its end: such an answer ends before that character (as vLLM's and TGI's streams
        do), rather than in a U+FFFD the model never wrote."""
        shown = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        self.read = len(self.ids)
        return text[len(shown):].rstrip("\ufffd") if cut else text[len(shown):]
