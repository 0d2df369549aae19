"""Incremental detokenization: text deltas for a growing token list at constant cost per token.

    detok = IncrementalDetokenizer(tokenizer.decode, skipped=tokenizer.special_ids)
    for ids in accepted_chunks:
        print(detok.push(ids), end="")     # only text that can no longer change
    print(detok.flush(cut=True))            # what was held back (cut: less an unfinished character at the end)

Decoding the whole output again at every step costs O(n) per step, O(n^2) per answer. Here only a short
window is decoded: the tokens since the last emitted text plus a few before them, because a token's text
can depend on its left neighbours (a leading space, a multi-byte character split over byte tokens). The
window's text minus the text of its already-emitted part is the delta (the scheme vLLM and TGI use). A
delta ending in U+FFFD (an incomplete UTF-8 character) is held back until the next token completes it. The
window starts where a character does: a byte-fallback decoder (Llama 2's, Mistral's) turns a run of byte tokens
that begins inside a character into U+FFFDs whole, the characters after it included.

The window stays bounded: tokens the decode skips (``skipped``: special tokens, e.g. end-of-sequence under
``ignore_eos``) never enter it, and a run held back for more than MAX_HELD tokens (bytes that never form a
character) is cut where its text splits cleanly in two, its first part emitted.
"""

from __future__ import annotations

from typing import Callable, Collection, Sequence

CONTEXT_TOKENS = 4  # tokens of left context decoded with the new ones
MAX_HELD = 64  # held-back tokens past which the held text is cut (no character spans more than 4 byte tokens)
CUT_TRIES = 8  # places a cut is tried at, so that a run that does not split costs a fixed amount per token


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str], skipped: Collection[int] = frozenset()) -> None:
        """``skipped``: ids ``decode`` leaves out wherever they stand (the special tokens it skips)."""
        self.decode = decode
        self.skipped = frozenset(skipped)
        self.ids: list[int] = []  # the tokens since the window's start could move, the skipped ones left out
        self.prefix = 0  # window start: context tokens whose text was emitted already
        self.read = 0  # tokens up to here have their text emitted
        # Where the window may start: token indices (in ``ids``) at which a character begins, the places text was
        # emitted up to (CONTEXT_TOKENS back may be inside a character of byte tokens).
        self.starts: list[int] = [0]
        # The complete characters of the text held back before an unfinished one at its end: final, though not
        # emitted yet, so a stop string they complete is found at the token that completes it (`TextOutput`).
        self.held = ""

    def push(self, ids: Sequence[int]) -> str:
        """Append tokens; return the new text that is final."""
        self.ids.extend(i for i in map(int, ids) if i not in self.skipped)
        if self.read == len(self.ids):
            return ""
        shown = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        if len(text) <= len(shown) or text.endswith("\ufffd"):
            # nothing visible yet, or the last character is unfinished: wait for more tokens
            delta = self._cut(shown, text) if len(self.ids) - self.read > MAX_HELD else ""
            self.held = text[len(shown) + len(delta):].rstrip("\ufffd")
            return delta
        return self._emit(len(self.ids), text[len(shown):])

    def _emit(self, read: int, delta: str) -> str:
        """The text of the tokens up to ``read`` is out: the window moves on (its start keeps its context)."""
        # The new start: the character start furthest back within CONTEXT_TOKENS, else the nearest one before them
        # (``starts`` holds the window's own start, so there is one)
        near = [b for b in self.starts if read - CONTEXT_TOKENS <= b]
        self.prefix = min(near) if near else self.starts[-1]
        self.read, self.held = read, ""
        self.starts.append(read)
        del self.ids[:self.prefix]  # tokens before the window are never decoded again
        self.starts = [b - self.prefix for b in self.starts if b >= self.prefix]
        self.read -= self.prefix
        self.prefix = 0
        return delta

    def _cut(self, shown: str, text: str) -> str:
        """A long held run's first part, where the window's text is the text of its two parts joined (what the
        tokens after the cut, the last 4 at least, cannot change); the window then starts at the cut. "" when
        no tried place splits (then the run is held on)."""
        ids, end = self.ids, len(self.ids)
        for cut in range(end - 4, max(self.read, end - 4 - CUT_TRIES), -1):
            head = self.decode(ids[self.prefix:cut])
            if head.startswith(shown) and head + self.decode(ids[cut:]) == text:
                delta = head[len(shown):]
                del self.ids[:cut]  # no left context: the split showed the rest decodes alike without it
                self.prefix = self.read = 0
                self.starts = [0]
                return delta
        return ""

    def flush(self, cut: bool = False) -> str:
        """The held-back text at the end of a generation; with ``cut`` (the token budget ended it), less an
        unfinished character at its end: such an answer ends before that character (as vLLM's and TGI's streams
        do), rather than in a U+FFFD the model never wrote."""
        shown = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        self.read, self.held = len(self.ids), ""
        return text[len(shown):].rstrip("\ufffd") if cut else text[len(shown):]
