"""Drafts from a corpus: what most often followed the sequence's last n tokens in a body of text (the idea of REST,
He et al. 2023, as an n-gram table).

    table = CorpusTable.load(artifact / "corpus_drafts.npz", vocab_size)     # written by `build` (exporter/corpus_table.py)
    draft = table.propose(tokens, 4)          # Draft(tokens=[...], ngram=n, kind=...) or None

Prompt lookup (`context_drafts.py`) finds what the prompt or the answer already said; the table knows the phrases a
chat answer is made of ("Here are some", "in order to", list and code formats), which the context does not hold
yet. For each n-gram length n (1 .. ``max_ngram``) the table maps the n tokens before a position to the token that
followed them most often in the corpus, and how often it did. A draft follows the longest known suffix one token at
a time, so it is the table's greedy continuation. Verification keeps only what greedy decoding would have produced:
the table changes speed, never tokens.

File (numpy ``.npz``, no pickles): for each n, ``keys_n`` (uint64, sorted: the n token ids packed ``bits`` bits
apiece, oldest first), ``next_n`` (uint32) and ``share_n`` (uint8: the share of the key's occurrences that the next
token took, in 255ths), and ``meta`` (int64: bits, max_ngram).
"""

from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np

from .context_drafts import DEFAULT_MAX_NGRAM, Draft
from .errors import ArtifactError
from .manifest_records import DRAFTS_FILE as FILE
from .npz_arrays import read_arrays

SHARE_CLASSES = (0.25, 0.5)  # a first draft's share below .25, below .5, or above: how often it was right measured
MAX_NGRAM = 4
CACHE_ENTRIES = 1 << 14  # suffixes `CorpusTable.lookup` remembers before it starts again


def rate_kind(ngram: int, share: float) -> int:
    """The acceptance-rate class of a corpus draft (`speculation.AcceptanceRates`): after the context drafts'
    classes (their n-gram lengths), one per n-gram length and share class."""
    return DEFAULT_MAX_NGRAM + 1 + (ngram - 1) * (len(SHARE_CLASSES) + 1) + bisect.bisect_right(SHARE_CLASSES, share)


NUM_KINDS = rate_kind(MAX_NGRAM, 1.0) + 1  # context classes and corpus classes together


def bits_for(vocab_size: int) -> int:
    return max(1, int(vocab_size - 1).bit_length())


def pack(tokens, bits: int) -> int:
    """n token ids as one key, oldest first (what `exporter/corpus_table.py` writes)."""
    key = 0
    for t in tokens:
        key = (key << bits) | int(t)
    return key


class CorpusTable:
    def __init__(self, keys: list[np.ndarray], nexts: list[np.ndarray], shares: list[np.ndarray], bits: int) -> None:
        self.keys, self.nexts, self.shares, self.bits = keys, nexts, shares, bits  # index n - 1
        self._cache: dict = {}  # suffix -> `lookup`'s answer (dict operations are atomic: threads may share it)
        self.max_ngram = len(keys)

    @property
    def entries(self) -> int:
        return sum(len(k) for k in self.keys)

    @classmethod
    def load(cls, path: str | Path, vocab_size: int, entries: int | None = None) -> "CorpusTable":
        """ArtifactError (one line, naming the fix) for a file that is not such a table for this vocabulary (of at
        most ``entries`` entries, when given: checked before its arrays are read)."""
        path = Path(path)
        try:
            # meta: 2 items; keys, next and share: an item per entry each
            z = read_arrays(path, _member_dtype, None if entries is None else max(entries, 2),
                            None if entries is None else 3 * entries + 2)
            meta = z["meta"]
            bits, max_ngram = int(meta[0]), int(meta[1])
            if bits != bits_for(vocab_size) or not 1 <= max_ngram <= min(MAX_NGRAM, 64 // bits):
                raise ValueError(f"its bits / max_ngram ({bits}, {max_ngram}) do not fit a {vocab_size}-token "
                                 f"vocabulary")
            arrays = [(z[f"keys_{n}"], z[f"next_{n}"], z[f"share_{n}"]) for n in range(1, max_ngram + 1)]
        except (OSError, KeyError, ValueError, IndexError) as e:
            raise ArtifactError(f"{path} is not a corpus-draft table ({str(e)[:120]}): rebuild the artifact "
                                f"(medusa-export build)") from None
        for n, (k, t, s) in enumerate(arrays, 1):
            ok = (k.dtype == np.uint64 and t.dtype == np.uint32 and s.dtype == np.uint8 and k.ndim == t.ndim == s.ndim
                  == 1 and len(k) == len(t) == len(s) and (len(k) < 2 or bool((k[1:] > k[:-1]).all()))
                  and (not len(t) or int(t.max()) < vocab_size) and (not len(k) or int(k.max()) >> (bits * n) == 0))
            if not ok:
                raise ArtifactError(f"{path}: the {n}-gram arrays are malformed (types, lengths, order or token ids): "
                                    f"rebuild the artifact (medusa-export build)")
        return cls(*map(list, zip(*arrays)), bits)

    def save(self, path: str | Path) -> None:
        """Uncompressed, so loading reads no more than the file holds."""
        arrays = {"meta": np.array([self.bits, self.max_ngram], np.int64)}
        for n in range(1, self.max_ngram + 1):
            arrays |= {f"keys_{n}": self.keys[n - 1], f"next_{n}": self.nexts[n - 1], f"share_{n}": self.shares[n - 1]}
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    def lookup(self, suffix: list[int], longest: int | None = None) -> tuple[int, int, float] | None:
        """(next token, n, share) for the longest known suffix of ``suffix`` (of at most ``longest`` tokens), or
        None. Cached: the suffixes a draft accepted in one step walked through are looked up again in the next, and
        each search of the arrays costs ~100 us right after a step (the caches hold the weights)."""
        key = tuple(suffix[-min(self.max_ngram, longest or self.max_ngram):])
        found = self._cache.get(key, self._cache)
        if found is self._cache:
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()
            found = self._cache[key] = self._search(key)
        return found

    def _search(self, suffix: tuple[int, ...]) -> tuple[int, int, float] | None:
        for n in range(len(suffix), 0, -1):
            keys = self.keys[n - 1]
            key = np.uint64(pack(suffix[-n:], self.bits))
            i = int(keys.searchsorted(key))  # the method: numpy's function wrapper costs as much again
            if i < len(keys) and keys[i] == key:
                return int(self.nexts[n - 1][i]), n, float(self.shares[n - 1][i]) / 255
        return None

    def propose(self, tokens: list[int], max_tokens: int) -> Draft | None:
        """The table's greedy continuation of ``tokens`` (up to ``max_tokens``), classed by its first token's match.
        After a match of n tokens the next one is at most n + 1 long: a key's first n tokens were followed by its last
        at least as often as the key itself was counted (n-grams never span texts), so they, and their shorter
        suffixes, are keys too."""
        suffix, out, first, longest = list(tokens[-self.max_ngram:]), [], None, None
        for _ in range(max(max_tokens, 0)):
            found = self.lookup(suffix, longest)
            if found is None:
                break
            first = first or found
            out.append(found[0])
            suffix = (suffix + [found[0]])[-self.max_ngram:]
            longest = found[1] + 1
        return Draft(out, first[1], rate_kind(first[1], first[2])) if out else None


def _member_dtype(name: str):
    """The dtype of a table member (`npz_arrays.read_arrays`), None for a name a table does not hold."""
    if name == "meta":
        return np.int64
    kind, _, n = name.partition("_")
    ok = n in {str(i) for i in range(1, MAX_NGRAM + 1)}
    return {"keys": np.uint64, "next": np.uint32, "share": np.uint8}.get(kind) if ok else None
