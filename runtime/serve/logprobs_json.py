"""`TokenLogprob` entries as OpenAI's ``logprobs`` objects: chat's ``{"content": [...]}`` and the completions
endpoint's ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``.

    pieces = TokenPieces(tokenizer)                   # each token's text and bytes, cached (one per server)
    answer = AnswerLogprobs(pieces, chat=True)        # one per answer
    choice["logprobs"] = answer.render(event.logprobs)
"""

from __future__ import annotations

import codecs
import re
from functools import lru_cache

from ..logprobs import TokenLogprob
from ..tokenizer import ChatTokenizer
from ..tokenizer_limits import component_tree


def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): printable Latin-1 bytes stand for themselves, the other bytes, in order,
    for the characters from U+0100 on. Reversed, it turns a token's piece into the bytes it writes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


_BYTE_OF_CHAR = _byte_of_char()
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


class TokenPieces:
    """A token's text (special tokens as written, part of a character as U+FFFD) and the UTF-8 bytes it adds to the
    answer (for byte-level tokenizers, exact also where a token holds part of a character)."""

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self._tok = tokenizer.tokenizer
        self.special = tokenizer.special_ids  # read as written (an answer's text skips them)
        try:
            decoder = component_tree(self._tok, "decoder") or {}
        except ValueError:  # loading refuses such a tokenizer; one built in Python: each token's decoded text
            decoder = {}
        parts = decoder.get("decoders", [decoder])
        kinds = [d.get("type") for d in parts]
        self._byte_level = "ByteLevel" in kinds
        # SentencePiece's (Llama 2, Mistral): "▁" for a space, which decoding one token alone strips, and byte pieces
        # (<0xF0>) for what the vocabulary lacks: read from the piece, so tokens join into the answer's text
        self._metaspace = "Metaspace" in kinds or any(
            d.get("type") == "Replace" and (d.get("pattern") or {}).get("String") == "\u2581" for d in parts)
        self.text = lru_cache(maxsize=65536)(self._text)
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _text(self, token_id: int) -> str:
        if (sp := self._sentencepiece(token_id)) is not None:
            return sp[0]
        return self._tok.decode([token_id], skip_special_tokens=False)

    def _sentencepiece(self, token_id: int) -> tuple[str, list[int]] | None:
        """A SentencePiece token's (text, bytes) from its piece; None for other tokenizers and special tokens."""
        piece = self._tok.id_to_token(token_id) if self._metaspace else None
        if piece is None or token_id in self.special:
            return None
        if (m := _BYTE_PIECE.fullmatch(piece)) is not None:
            b = int(m.group(1), 16)
            return (chr(b) if b < 0x80 else "\ufffd"), [b]
        text = piece.replace("\u2581", " ")
        return text, list(text.encode("utf-8"))

    def _bytes(self, token_id: int) -> list[int]:
        if (sp := self._sentencepiece(token_id)) is not None:
            return sp[1]
        text = self.text(token_id)
        piece = self._tok.id_to_token(token_id) if self._byte_level and "\ufffd" in text else None
        if piece and all(c in _BYTE_OF_CHAR for c in piece):
            return [_BYTE_OF_CHAR[c] for c in piece]
        return list(text.encode("utf-8"))


class AnswerLogprobs:
    """One answer's ``logprobs`` objects in its endpoint's shape, rendered token by token as they come (a stream's
    chunks each carry their tokens'; the completions endpoint's ``text_offset`` runs on over the whole answer)."""

    def __init__(self, pieces: TokenPieces, chat: bool) -> None:
        self.pieces, self.chat = pieces, chat
        self.offset = 0  # characters of the text the tokens rendered so far write
        # A character split over tokens counts once, where its last byte arrives (each of its tokens' texts shows
        # U+FFFD): the offsets are positions in the answer's text, as a client slices it
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _advance(self, token_id: int, written: bool = True) -> int:
        """``token_id``'s ``text_offset``; the offset moves past the characters its bytes complete. ``written``
        False: a special token of the answer, which the answer's text leaves out (its decode skips them)."""
        if not written:
            return self.offset
        data = bytes(self.pieces.bytes(token_id))
        if data and not 0x80 <= data[0] <= 0xBF and self._utf8.getstate()[0]:
            # Bytes held for an earlier token's character that this token cuts short: the text shows them as U+FFFD
            # before this token's characters
            self.offset += len(self._utf8.decode(b"", final=True))
        at = self.offset
        self.offset += len(self._utf8.decode(data))
        return at

    def _end_prompt(self) -> None:
        """The echoed prompt's text is decoded apart from the answer's: a character it leaves unfinished is U+FFFD
        there, and the answer's bytes start afresh."""
        self.offset += len(self._utf8.decode(b"", final=True))

    def render(self, entries: list[TokenLogprob]) -> dict:
        return self._chat(entries) if self.chat else self._completion(entries)

    def render_echo(self, ids: list[int], prompt: list[TokenLogprob | None], answer: list[TokenLogprob]) -> dict:
        """The completions endpoint's object with ``echo``: the prompt's tokens, whose first has no log-probability
        (null), then the answer's."""
        first = self.pieces.text(ids[0])
        self._advance(ids[0])
        scored = self._completion(prompt[1:], written=True)
        self._end_prompt()
        said = self._completion(answer)
        rest = {k: v + said[k] for k, v in scored.items()}
        return {"tokens": [first, *rest["tokens"]], "token_logprobs": [None, *rest["token_logprobs"]],
                "top_logprobs": [None, *rest["top_logprobs"]], "text_offset": [0, *rest["text_offset"]]}

    def _chat(self, entries: list[TokenLogprob]) -> dict:
        """Per token its text, log-probability, bytes and the best alternatives."""
        def one(token_id: int, logprob: float) -> dict:
            return {"token": self.pieces.text(token_id), "logprob": logprob, "bytes": self.pieces.bytes(token_id)}

        return {"content": [one(e.token_id, e.logprob) | {"top_logprobs": [one(i, lp) for i, lp in e.top]}
                            for e in entries], "refusal": None}

    def _completion(self, entries: list[TokenLogprob], written: bool = False) -> dict:
        """``written``: the echoed prompt's tokens, special ones as written (else the answer's, which skips them)."""
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            text = self.pieces.text(e.token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(e.logprob)
            # As OpenAI's: the best alternatives and the chosen token itself (so logprobs 0 still names it). Tokens
            # of one text (parts of characters, all "\ufffd") share a key: it holds the best of them, or the chosen
            # token's own value (top_logprobs[i][tokens[i]] == token_logprobs[i])
            top: dict[str, float] = {}
            for i, lp in e.top:
                top.setdefault(self.pieces.text(i), lp)
            top[text] = e.logprob
            out["top_logprobs"].append(top)
            out["text_offset"].append(self._advance(e.token_id, written or e.token_id not in self.pieces.special))
        return out
