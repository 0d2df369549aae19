"""How much longer a tokenizer's own components can make a text, bounded from their JSON, so that a tokenizer.json
that multiplies text without limit is refused when it loads rather than when a request runs the process out of
memory (a normalizer of eight Replace steps, each turning "H" into 16 of them, makes one "H" 4 G characters).

    check_growth(tokenizer, "artifacts/x/tokenizer.json")   # None, or an ArtifactError naming the component
    factors = growth_factors(tokenizer)                       # {"normalizer": 12.0, "decoder": 1.0, ...}

Lengths are UTF-8 bytes, what the `tokenizers` library works in. Each component gets a factor: a piece of text of
n >= 1 bytes comes out of it at most ``factor * n`` bytes long (a constant it adds, such as Prepend's text, counts as
if the piece were one byte long, the worst case). Components in a row multiply: encoding runs the normalizer, the
pre-tokenizer and the post-processor in a row, decoding runs the decoder on the tokens' text. The components are
read from the loaded tokenizer's own serialization, so what is bounded is what the library will run.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re

from .errors import ArtifactError

# Real tokenizers stay far below: Llama-2's Prepend + Replace(" ", "▁") is 12, CLIP's NFC + Lowercase + ByteLevel
# 18, a T5 or XLM-R SentencePiece NFKC charsmap with Metaspace about 44. At 64 a 1 MiB request body becomes at most
# 64 MiB of text (a 32-fold Replace on 1 MiB took 16 s and 2.2 GB in `tokenizers`; 16 ** 8 takes all memory).
MAX_GROWTH = 64
MAX_DEPTH = 8  # Sequences inside Sequences; real tokenizers nest one or two deep
MAX_COMPONENTS = 64  # per slot: each is a pass over every request's text, and real ones have fewer than ten
ENCODE_SLOTS = ("normalizer", "pre_tokenizer", "post_processor")
SLOTS = ENCODE_SLOTS + ("decoder",)
FIX = "rebuild the artifact with the model's own tokenizer"

_MEMBERS = {"normalizer": "normalizers", "pre_tokenizer": "pretokenizers", "decoder": "decoders",
            "post_processor": "processors"}  # the list a Sequence holds, per slot
# Components that only remove, split or map a character to one no longer (tokenizers 0.23's sources): Strip and
# StripAccents remove, Nmt maps control and space characters to " "; the pre-tokenizers only split; the decoders
# map "▁" or a "<0xNN>" token to fewer bytes, join or strip; these post-processors add special tokens only when
# asked to (the runtime never asks) or fix offsets.
_NO_GROWTH = {
    "normalizer": frozenset({"Strip", "StripAccents", "Nmt"}),
    "pre_tokenizer": frozenset({"BertPreTokenizer", "CharDelimiterSplit", "Digits", "FixedLength", "Punctuation",
                                "Split", "UnicodeScripts", "Whitespace", "WhitespaceSplit"}),
    "decoder": frozenset({"ByteFallback", "Fuse", "Metaspace", "Strip"}),
    "post_processor": frozenset({"BertProcessing", "ByteLevel", "RobertaProcessing"}),
}
# Unicode's own limits on how much a normalization form lengthens UTF-8 text (UAX #15; checked over every code point)
_UNICODE_FORMS = {"NFC": 3.0, "NFD": 3.0, "NFKC": 11.0, "NFKD": 11.0}
_LOWERCASE = 1.5  # "İ" (2 bytes) lowercases to "i̇" (3); no character grows more
_CJK_SPACED = 5 / 3  # BertNormalizer writes " 中 " for a CJK character of at least 3 bytes


class _Unbounded(Exception):
    """A component whose growth cannot be bounded here (its text says why)."""


def check_vocabulary(tokenizer, origin: object, vocab_size: int) -> None:
    """ArtifactError unless the tokenizer's ids fit the model's ``vocab_size`` and cover most of it: a model pads
    its vocabulary past its tokenizer (Qwen2 by 271 ids, DeepSeek-LLM by 2,385, up to a multiple of 4,096), and a
    token id the tokenizer lacks would decode to nothing, silently."""
    size, largest = tokenizer.get_vocab_size(), largest_id(tokenizer)
    missing = vocab_size - size
    if size > vocab_size or largest >= vocab_size or missing > max(MAX_PADDED_IDS, vocab_size // 20):
        raise ArtifactError(f"{origin} has {size} tokens with ids up to {largest}, but the model's vocabulary is "
                            f"{vocab_size}: it belongs to another model, rebuild the artifact")


MAX_PADDED_IDS = 4096  # ids a model may have past its tokenizer's (or 5 % of its vocabulary, if more)


def largest_id(tokenizer) -> int:
    """The largest id of a `tokenizers.Tokenizer`'s vocabulary, added tokens included (-1 when empty)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)


def check_growth(tokenizer, origin: object) -> None:
    """An ArtifactError naming ``origin`` (the file) and the component when ``tokenizer`` (a `tokenizers.Tokenizer`)
    can make a text more than MAX_GROWTH times longer when it encodes or when it decodes, or when a component's
    growth cannot be bounded (an unknown type, nesting or a count of components past the limits)."""
    factors, names = {}, {}
    for slot in SLOTS:
        try:
            found = _slot_factor(tokenizer, slot)
        except _Unbounded as e:
            raise ArtifactError(f"{origin}: its {slot} {e}, so how much it lengthens a text cannot be bounded: "
                                f"{FIX}") from None
        if found is not None:
            factors[slot], names[slot] = found
    for path, slots in (("encoding", ENCODE_SLOTS), ("decoding", ("decoder",))):
        growing = [slot for slot in slots if factors.get(slot, 1.0) > 1.0]
        total = math.prod(factors[slot] for slot in growing)
        if total > MAX_GROWTH:
            parts = " and ".join(f"{slot} ({names[slot]}, x{_times(factors[slot])})" for slot in growing)
            raise ArtifactError(f"{origin}: its {parts} can make a text up to {_times(total)} times longer when "
                                f"{path} (at most {MAX_GROWTH}): {FIX}")


def growth_factors(tokenizer) -> dict[str, float]:
    """Each present component's factor, by slot; ValueError where one cannot be bounded."""
    factors = {}
    for slot in SLOTS:
        try:
            found = _slot_factor(tokenizer, slot)
        except _Unbounded as e:
            raise ValueError(f"its {slot} {e}") from None
        if found is not None:
            factors[slot] = found[0]
    return factors


def component_tree(tokenizer, slot: str) -> dict | None:
    """``tokenizer``'s component in ``slot`` (``"decoder"``, ...) as the library's own serialization of it, what it
    will run; None when it has none; ValueError where it cannot be serialized. Its own JSON alone: serializing the
    whole tokenizer (its vocabulary) takes about 80 ms for the default model."""
    component = getattr(tokenizer, slot)
    if component is None:
        return None
    try:
        return json.loads(component.__getstate__())
    except Exception as e:  # noqa: BLE001 - one defined in Python has none; a deep tree, a RecursionError
        raise ValueError(f"cannot be serialized ({type(e).__name__})") from None


def _slot_factor(tokenizer, slot: str) -> tuple[float, str] | None:
    """(factor, a short name for the message) of ``tokenizer``'s component in ``slot``; None when it has none."""
    try:
        tree = component_tree(tokenizer, slot)
    except ValueError as e:
        raise _Unbounded(str(e)) from None
    if tree is None:
        return None
    walk = _Walk(slot)
    factor = walk.factor(tree, 0)
    kind = str(tree.get("type"))[:40]
    growers = ", ".join(dict.fromkeys(walk.growers))
    return factor, (f"{kind} with {growers}" if kind == "Sequence" and growers else kind)


class _Walk:
    """One slot's component tree, walked for its factor; ``growers`` lists the types that lengthen text."""

    def __init__(self, slot: str) -> None:
        self.slot = slot
        self.seen = 0
        self.growers: list[str] = []

    def factor(self, node: object, depth: int) -> float:
        if depth > MAX_DEPTH:
            raise _Unbounded(f"nests Sequences more than {MAX_DEPTH} deep")
        self.seen += 1
        if self.seen > MAX_COMPONENTS:
            raise _Unbounded(f"has more than {MAX_COMPONENTS} components")
        if not isinstance(node, dict):
            raise _Unbounded("has a component that is not a JSON object")
        kind = node.get("type")
        if kind == "Sequence":
            members = node.get(_MEMBERS[self.slot])
            if not isinstance(members, list):
                raise _Unbounded(f"has a Sequence without its {_MEMBERS[self.slot]}")
            return math.prod(self.factor(member, depth + 1) for member in members)
        factor = max(1.0, _leaf_factor(self.slot, kind, node))
        if factor > 1.0:
            self.growers.append(str(kind))
        return factor


def _leaf_factor(slot: str, kind: object, node: dict) -> float:
    """The factor of one component that is not a Sequence (see the module's docstring for what it bounds)."""
    if kind in _NO_GROWTH[slot]:
        return 1.0
    if slot == "normalizer":
        if kind in _UNICODE_FORMS:
            return _UNICODE_FORMS[kind]
        if kind == "Lowercase":
            return _LOWERCASE
        if kind == "BertNormalizer":  # strip_accents is NFD then dropping marks: at most NFD's growth
            strip = node.get("strip_accents")
            strip = node.get("lowercase") if strip is None else strip
            return ((_CJK_SPACED if node.get("handle_chinese_chars") else 1.0) * (3.0 if strip else 1.0)
                    * (_LOWERCASE if node.get("lowercase") else 1.0))
        if kind == "ByteLevel":  # every byte becomes a character of at most 2 bytes
            return 2.0
        if kind == "Prepend":  # once per piece of text
            return 1.0 + len(_text(node, "prepend").encode())
        if kind == "Replace":
            return _replace_factor(node)
        if kind == "Precompiled":
            return _charsmap_factor(node.get("precompiled_charsmap"))
    elif slot == "pre_tokenizer":
        if kind == "ByteLevel":  # a " " in front of each piece, then every byte a character of at most 2 bytes
            return 4.0 if node.get("add_prefix_space") else 2.0
        if kind == "Metaspace":  # " " becomes the replacement; one more in front of each piece unless "never"
            size = len(_text(node, "replacement").encode())
            return size + (0 if node.get("prepend_scheme") == "never" else 1)
    elif slot == "decoder":
        if kind == "Replace":
            return _replace_factor(node)
        if kind == "ByteLevel":  # a stray byte from a 2-byte character becomes U+FFFD (3 bytes)
            return 1.5
        if kind == "WordPiece":  # a " " in front of each token (its prefix is stripped instead)
            return 2.0
        if kind == "BPEDecoder":  # the suffix becomes " ": an empty one puts a " " around every character
            return 3.0 if _text(node, "suffix") == "" else 1.0
        if kind == "CTC":  # the word delimiter becomes " " (after cleanup): an empty one, around every character
            return 3.0 if node.get("cleanup") and _text(node, "word_delimiter_token") == "" else 1.0
    elif slot == "post_processor" and kind == "TemplateProcessing":
        # Each $A of the single-sequence template repeats the whole encoding (special tokens: only when asked for)
        single = node.get("single")
        if not isinstance(single, list):
            raise _Unbounded("has a TemplateProcessing without its single template")
        return float(sum(1 for piece in single if isinstance(piece, dict) and "Sequence" in piece))
    raise _Unbounded(f"has a component of type {str(kind)[:40]!r} that this runtime does not know")


def _text(node: dict, key: str) -> str:
    value = node.get(key)
    if not isinstance(value, str):
        raise _Unbounded(f"has a {node.get('type')} whose {key} is not text")
    return value


def _replace_factor(node: dict) -> float:
    """Replace: every match of the pattern becomes the content. Matches of at least L bytes make a text at most
    len(content) / L times longer; a pattern that can match nothing matches before every byte and at the end."""
    pattern, content = node.get("pattern"), _text(node, "content")
    if not (isinstance(pattern, dict) and len(pattern) == 1):
        raise _Unbounded("has a Replace whose pattern is neither String nor Regex")
    (kind, source), = pattern.items()
    if not isinstance(source, str) or kind not in ("String", "Regex"):
        raise _Unbounded("has a Replace whose pattern is neither String nor Regex")
    shortest = len(source.encode()) if kind == "String" else regex_min_bytes(source)
    added = len(content.encode())
    return 1.0 + 2 * added if shortest == 0 else added / shortest


def _charsmap_factor(encoded: object) -> float:
    """Precompiled (a SentencePiece charsmap: little-endian u32 trie size, a double-array trie, then NUL-ended
    replacements). `tokenizers` replaces a grapheme under 6 bytes, or else each character, by the replacement of its
    shortest prefix in the trie; so a key of k bytes grows text by at most its replacement's length / k. Keys of one
    and two bytes are looked up; longer ones are bounded by the longest replacement / 3."""
    try:
        data = base64.b64decode(encoded, validate=True)  # type: ignore[arg-type]
    except (binascii.Error, ValueError, TypeError):
        raise _Unbounded("has a Precompiled whose precompiled_charsmap is not base64") from None
    size = int.from_bytes(data[:4], "little")
    if len(data) < 4 or size > len(data) - 4:
        raise _Unbounded("has a Precompiled whose precompiled_charsmap is cut short")
    trie, pool = data[4:4 + size], data[4 + size:]
    factor = max(len(part) for part in pool.split(b"\0")) / 3
    for key_bytes, length in _short_rules(trie, pool):
        factor = max(factor, length / key_bytes)
    return factor


def _short_rules(trie: bytes, pool: bytes) -> list[tuple[int, int]]:
    """(key bytes, replacement bytes) of the rules whose key is one or two bytes long, looked up as the library does
    (darts-clone units: label in bits 0-7, has-leaf bit 8, offset from bit 10, shifted 8 more when bit 9 is set; a
    lookup that falls outside the array panics in the library, so it is no rule here)."""
    count = len(trie) // 4

    def unit(i: int) -> int | None:
        return int.from_bytes(trie[4 * i:4 * i + 4], "little") if i < count else None

    def offset(u: int) -> int:
        return (u >> 10) << ((u & (1 << 9)) >> 6)

    root = unit(0)
    if root is None:
        return []
    rules, frontier = [], {offset(root)}
    for depth in (1, 2):
        children = set()
        for node in frontier:
            for label in range(1, 256):  # a NUL byte ends the lookup
                u = unit(node ^ label)
                if u is None or u & ((1 << 31) | 0xFF) != label:
                    continue
                child = node ^ label ^ offset(u)
                children.add(child)
                leaf = unit(child) if u & (1 << 8) else None
                if leaf is not None:
                    start = leaf & 0x7FFFFFFF
                    end = pool.find(b"\0", start)
                    rules.append((depth, max(0, (len(pool) if end < 0 else end) - start)))
        frontier = children
    return rules


class _Unsure(Exception):
    """Part of a regular expression this reader does not interpret."""


_ONE_CHAR_ESCAPES = frozenset("dDwWsShHnrtfvae")
_LITERAL_ESCAPES = frozenset(".*+?()[]{}|^$\\/-")
_ZERO_WIDTH_ESCAPES = frozenset("AzZbBG")
_INTERVAL = re.compile(r"\{([0-9]*)(,?)([0-9]*)\}")  # ASCII digits only, as Oniguruma reads them
_POSIX_BRACKET = re.compile(r"\[:\^?[a-z]+:\]")


def regex_min_bytes(pattern: str) -> int:
    """A lower bound on the bytes of any match of ``pattern``, an Oniguruma regular expression (what a `tokenizers`
    Replace compiles); 0 where it cannot tell. Only a plain subset is read: literals, ``.``, classes, the escapes
    ``\\d \\s \\w \\n`` and kin, escaped punctuation, anchors, groups ``( )``, ``(?: )`` and ``(?> )``, alternation
    and the quantifiers ``? * + {n,m}``. Anything else (flags, which can fold one character onto several;
    look-arounds; back-references; ``\\K``; nested classes) gives 0: a low bound only makes the factor larger."""
    try:
        width, end = _alternatives(pattern, 0, 0)
    except (_Unsure, IndexError, ValueError):
        return 0
    return width if end == len(pattern) else 0


def _alternatives(p: str, i: int, depth: int) -> tuple[int, int]:
    shortest, i = _concatenation(p, i, depth)
    while i < len(p) and p[i] == "|":
        width, i = _concatenation(p, i + 1, depth)
        shortest = min(shortest, width)
    return shortest, i


def _concatenation(p: str, i: int, depth: int) -> tuple[int, int]:
    total = 0
    while i < len(p) and p[i] not in "|)":
        width, i = _atom(p, i, depth)
        while i < len(p) and p[i] in "*+?{":  # each read as a quantifier of its own: "+?" counts as "?", lower
            if p[i] == "{":
                m = _INTERVAL.match(p, i)
                if not m or not (m[1] or m[3]):
                    raise _Unsure  # "{" as a literal, or "{,}": engines differ
                width, i = width * int(m[1] or 0), m.end()  # "{,n}" is "{0,n}" to Oniguruma
            else:
                width, i = (width if p[i] == "+" else 0), i + 1
        total += width
    return total, i


def _atom(p: str, i: int, depth: int) -> tuple[int, int]:
    c = p[i]
    if c == "(":
        if depth >= 32:
            raise _Unsure
        if p.startswith(("(?:", "(?>"), i):
            i += 3
        elif p.startswith("(?", i):
            raise _Unsure
        else:
            i += 1
        width, i = _alternatives(p, i, depth + 1)
        if p[i] != ")":
            raise _Unsure
        return width, i + 1
    if c == "[":
        return 1, _class_end(p, i)
    if c == "\\":
        escaped = p[i + 1]
        if escaped in _ONE_CHAR_ESCAPES or escaped in _LITERAL_ESCAPES:
            return 1, i + 2
        if escaped in _ZERO_WIDTH_ESCAPES:
            return 0, i + 2
        raise _Unsure
    if c in "^$":
        return 0, i + 1
    if c in "*+?{":
        raise _Unsure  # a quantifier with nothing to repeat
    return len(c.encode("utf-8", "surrogatepass")), i + 1  # "." and a literal: one character


def _class_end(p: str, i: int) -> int:
    """The index after the character class (one character) that opens at ``p[i]``."""
    j = i + 1 + (p[i + 1] == "^")
    if p[j] == "]":
        raise _Unsure  # "[]...]": a literal "]" to some engines, an empty class to others
    while p[j] != "]":
        if p[j] == "\\":
            j += 2
        elif p[j] == "[":
            m = _POSIX_BRACKET.match(p, j)
            if not m:
                raise _Unsure  # a nested class or set operation
            j = m.end()
        else:
            j += 1
    return j + 1


def _times(factor: float) -> str:
    return f"{factor:.3g}" if factor < 1e15 else "over 1e15"
