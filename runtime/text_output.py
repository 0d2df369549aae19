"""Tokens in, text out, for one answer: end of sequence, the token budget, stop strings, incremental detokenizing.

    out = TextOutput(tokenizer, cfg)
    event = out.push([5, 6, 7])     # a StreamEvent (text shown so far may hold back a possible stop string), or None
    out.finish                      # None, "stop" or "length" once the answer is complete

The decode loop (one sequence) and the batched engine (many) both hand each step's tokens to one of these, so
stopping and streaming are the same whichever produced the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from .generation_config import GenerationConfig
from .logprobs import TokenLogprob
from .detokenize import IncrementalDetokenizer


@dataclass
class StreamEvent:
    text: str  # new text since the previous event
    token_ids: list[int]  # tokens accepted in this step
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when the request asked for them
    # On a request's first event, when it scored its prompt: one per prompt token, None for the first (the batched
    # engine's; a stream that echoes the prompt sends them before the answer)
    prompt_logprobs: list[TokenLogprob | None] | None = None


class TextOutput:
    def __init__(self, tokenizer, cfg: GenerationConfig) -> None:
        self.cfg = cfg
        self.eos = set() if cfg.ignore_eos else set(tokenizer.eos_token_ids)
        # Special tokens (which the decode skips) stay out of its window: under ignore_eos a run of end-of-sequence
        # tokens would otherwise grow it, and each token's decode with it, without bound.
        self.detok = IncrementalDetokenizer(tokenizer.decode, getattr(tokenizer, "special_ids", frozenset()))
        self.tail_len = max((len(s) for s in cfg.stop_strings), default=1) - 1
        self.new: list[int] = []
        self.logprobs: list[TokenLogprob] | None = None if cfg.logprobs is None else []  # one per token of ``new``
        self.eos_logprob: TokenLogprob | None = None  # the end-of-sequence token's that ended it, when asked for
        self.shown: list[str] = []
        self.shown_tail = ""  # the last tail_len characters of the shown text, kept as it grows (a walk was cubic)
        self.pending = ""  # decoded text not shown yet (it may begin a stop string)
        self.finish: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.shown)

    def push(self, chunk: list[int]) -> StreamEvent | None:
        """Take one step's tokens; the event to show, if any. Tokens after an end are dropped: after an end of
        sequence, the budget, or the token that completes a stop string (tokens are detokenized one at a time, as
        plain decoding makes them, so a speculative step keeps and counts exactly the tokens plain decoding would)."""
        if self.finish:
            return None
        kept, tail, cut, eos = [], self.shown_tail, False, False
        for tok in chunk:
            if tok in self.eos:
                self.finish, eos = "stop", True
                break
            kept.append(tok)
            self.pending += self.detok.push([tok])
            cut = self._cut_at_stop(tail)
            if cut:
                break
            if len(self.new) + len(kept) >= self.cfg.max_new_tokens:
                self.finish = "length"
                break
        self.new += kept
        entries = getattr(chunk, "logprobs", None)  # `FinalTokens` when the request asked for them
        if self.logprobs is not None:
            if entries is None or len(entries) < len(kept) + int(eos):  # else every later event's entries shift silently
                raise ValueError(f"logprobs were asked for but this step's {len(chunk)} tokens came without "
                                 f"theirs: pass the `FinalTokens` the decode step returned")
            self.logprobs += entries[:len(kept)]
            if eos:  # not a token of the answer, but the completions endpoint shows it (as OpenAI's did)
                self.eos_logprob = entries[len(kept)]
        return self._show(kept, tail, flush=bool(self.finish) and not cut)

    def end(self, reason: str) -> StreamEvent | None:
        """End the answer for a reason outside its tokens (the KV capacity is full: "length"); the event with the
        text held back so far (a possible stop string's beginning, an unfinished character), as the token budget's
        end shows it. None when it had ended already or nothing was held back."""
        if self.finish:
            return None
        self.finish = reason
        return self._show([], self.shown_tail, flush=True)

    def _show(self, kept: list[int], tail: str, flush: bool) -> StreamEvent | None:
        """The event for ``kept`` and the text that may be shown now (all of it once the answer has ended)."""
        if flush:
            self.pending += self.detok.flush(cut=self.finish == "length")
            self._cut_at_stop(tail)  # a stop string completed by the held-back end of the text
        visible = self.pending if self.finish else _safe_prefix(self.pending, self.cfg.stop_strings)
        if not (visible or kept):
            return None
        self.shown.append(visible)
        if self.tail_len:
            self.shown_tail = (self.shown_tail + visible)[-self.tail_len:]
        self.pending = self.pending[len(visible):]
        return StreamEvent(visible, kept, None if self.logprobs is None else self.logprobs[len(self.new) - len(kept):])

    def _cut_at_stop(self, tail: str) -> bool:
        """Cut the pending text at the earliest complete stop string, if any (the answer then ends: "stop"). Searched
        with the complete characters the detokenizer holds back too: a token whose text is "!" and the first bytes
        of an emoji completes the stop string "!" itself, not the token that finishes the emoji."""
        if not self.cfg.stop_strings:
            return False
        text = self.pending + self.detok.held
        cut = _find_stop(tail, text, self.cfg.stop_strings)
        if cut is None:
            return False
        self.pending, self.finish = text[:cut], "stop"
        return True


def _find_stop(shown_tail: str, pending: str, stops: tuple[str, ...]) -> int | None:
    """Where in ``pending`` the text must be cut for the earliest stop string, which may begin in the
    already-shown tail (then at 0); None when there is none."""
    text = shown_tail + pending
    hits = [i for s in stops if s for i in [text.find(s)] if i >= 0]
    return max(0, min(hits) - len(shown_tail)) if hits else None


def _safe_prefix(text: str, stops: tuple[str, ...]) -> str:
    """Hold back any tail that could begin a stop string (unfinished characters are held by the detokenizer)."""
    end = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[end - k:end] == s[:k]:
                end -= k
                break
    return text[:end]
