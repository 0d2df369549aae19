"""Filters that turn raw prompts into a training set: length, language, duplicates, evaluation overlap.

    kept, counts = filter_prompts(prompts, PromptFilter(), exclude=shipped_eval_fingerprints())
    counts   # {"input": 11144, "empty": 3, "too_short": ..., "near_duplicate": ..., "eval_overlap": ..., "kept": ...}

Why each filter:
- length: empty prompts teach nothing; over-long ones cost prefill time and rarely fit the context.
- language: the default model (SmolLM2) is English-only; its answers to other languages are noise to imitate.
  A dependency-free test: letters mostly Latin, and English function words at least as frequent as those of
  the other common Latin-script languages of ShareGPT.
- duplicates: exact (normalised text) and near (word 3-gram Jaccard >= 0.8, found with MinHash LSH) copies
  weight one question many times and would leak between training and held-out prompts.
- evaluation overlap: a prompt that copies or nearly copies an evaluation question (MT-Bench) would make the
  benchmark measure memorisation. Matched on fingerprints (hashed word 3-grams), so the repository can ship
  the exclusion list without the questions' text.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medusa_export.runtime.errors import InputError
from medusa_export.runtime.prompts import check_jsonl_file, check_text, jsonl_rows, prompt_of

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
SHINGLE = 3
MIN_CONTAINED = 4  # word 3-grams a text needs before "contained in a question" is evidence of a copy
FINGERPRINTS_FORMAT = "medusa-export-eval-fingerprints-v1"
SHIPPED_FINGERPRINTS = Path(__file__).with_name("mt_bench_fingerprints.json")

# Function words, chosen not to be common English words; a prompt is English when English ones are at least
# as frequent as any other language's.
_FUNCTION_WORDS = {
    "en": ("the and is are of to you what how this that with for it can please write my your be from in on why do "
           "we have an not as at by or if me i a there which should would").split(),
    "es": "el los las que y por para una con del se es como más pero este esta muy".split(),
    "fr": "le les des et est une pour dans qui pas vous je avec sur ce du au cette".split(),
    "de": "der das und ist nicht ein eine ich zu mit sie für auf den dem sich wie auch".split(),
    "pt": "os que não uma um para com é em da dos por mais você são".split(),
    "it": "il di che per un una non sono con della è gli mi ti questo".split(),
}


@dataclass
class PromptFilter:
    min_chars: int = 10
    max_chars: int = 2000
    english_only: bool = True
    near_duplicate_jaccard: float = 0.8  # word 3-gram Jaccard at which two prompts count as one
    eval_jaccard: float = 0.5  # looser for the evaluation set: a reworded question must go too
    eval_containment: float = 0.8  # share of one text's 3-grams found in the other


# Invisible format characters (Unicode category Cf: soft hyphen, zero-width space and joiners, direction marks,
# BOM): NFKC keeps them, and inside a word they split it, so "wr\u200bite" would not match "write".
_INVISIBLE = re.compile("[\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff"
                        "\ufff9-\ufffb]")


def normalise(text: str) -> str:
    """Lower-cased NFKC words without invisible characters, one space apart: what copies are compared on."""
    return " ".join(_WORD.findall(_INVISIBLE.sub("", unicodedata.normalize("NFKC", text)).lower()))


def shingles(text: str) -> set[int]:
    """Hashed word 3-grams of the normalised text (the whole text for shorter ones)."""
    words = normalise(text).split()
    grams = [" ".join(words[i:i + SHINGLE]) for i in range(max(1, len(words) - SHINGLE + 1))]
    return {int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") >> 1 for g in grams}


def is_english(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    if letters and sum(1 for c in letters if not _latin(c)) > 0.2 * len(letters):
        return False
    counts = Counter(w for w in _WORD.findall(text.lower()))
    score = {lang: sum(counts[w] for w in words) for lang, words in _FUNCTION_WORDS.items()}
    return score["en"] >= max(v for k, v in score.items() if k != "en")


def _latin(c: str) -> bool:
    return c.isascii() or unicodedata.name(c, "").startswith("LATIN")


def filter_prompts(prompts: list[str], cfg: PromptFilter, exclude: "EvalFingerprints | None" = None
                   ) -> tuple[list[int], dict]:
    """Indices of the prompts that pass every filter (in input order) and how many each filter removed."""
    counts = {"input": len(prompts)}
    keep = list(range(len(prompts)))

    def apply(name: str, ok) -> None:
        nonlocal keep
        before = len(keep)
        keep = [i for i in keep if ok(i)]
        counts[name] = before - len(keep)

    apply("empty", lambda i: bool(prompts[i].strip()))
    apply("too_short", lambda i: len(prompts[i].strip()) >= cfg.min_chars)
    apply("too_long", lambda i: len(prompts[i]) <= cfg.max_chars)
    if cfg.english_only:
        apply("not_english", lambda i: is_english(prompts[i]))
    sets = {i: shingles(prompts[i]) for i in keep}
    if exclude is not None:
        hits = exclude.matches({i: sets[i] for i in keep}, {i: normalise(prompts[i]) for i in keep}, cfg)
        apply("eval_overlap", lambda i: i not in hits)
    seen: set[str] = set()

    def first_copy(i: int) -> bool:
        key = normalise(prompts[i])
        new = key not in seen
        seen.add(key)
        return new

    apply("exact_duplicate", first_copy)
    dropped = near_duplicates([sets[i] for i in keep], cfg.near_duplicate_jaccard)
    dropped_ids = {keep[j] for j in dropped}
    apply("near_duplicate", lambda i: i not in dropped_ids)
    counts["kept"] = len(keep)
    return keep, counts


def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / max(1, len(a | b))


def near_duplicates(sets: list[set[int]], threshold: float, bands: int = 16, rows: int = 4, seed: int = 0) -> set[int]:
    """Positions of sets that nearly copy an earlier kept one: MinHash LSH finds candidates, Jaccard decides."""
    if not sets:
        return set()
    rng = np.random.default_rng(seed)
    perms = bands * rows
    mult = rng.integers(1, 2**61, perms, dtype=np.uint64) | np.uint64(1)
    add = rng.integers(0, 2**61, perms, dtype=np.uint64)
    sig = np.empty((len(sets), perms), np.uint64)
    for i, s in enumerate(sets):
        h = np.fromiter(s, np.uint64, len(s))
        sig[i] = (h[:, None] * mult[None, :] + add[None, :]).min(axis=0)  # wraps mod 2**64: a cheap hash family
    candidates: dict[int, set[int]] = {}
    for b in range(bands):
        buckets: dict[bytes, list[int]] = {}
        for i, key in enumerate(sig[:, b * rows:(b + 1) * rows]):
            buckets.setdefault(key.tobytes(), []).append(i)
        for members in buckets.values():
            for j in members[1:]:
                candidates.setdefault(j, set()).update(m for m in members if m < j)
    dropped: set[int] = set()
    for j in sorted(candidates):
        if any(i not in dropped and jaccard(sets[i], sets[j]) >= threshold for i in candidates[j]):
            dropped.add(j)
    return dropped


@dataclass
class EvalFingerprints:
    """Hashed word 3-grams and normalised-text hashes of an evaluation set's questions (no text)."""

    name: str
    questions: list[dict]  # {"id": str, "text_sha256": str, "shingles": [int, ...]}

    @classmethod
    def from_prompts(cls, name: str, rows: list[tuple[str, str]]) -> "EvalFingerprints":
        return cls(name, [{"id": qid, "text_sha256": hashlib.sha256(normalise(text).encode()).hexdigest(),
                           "shingles": sorted(shingles(text))} for qid, text in rows])

    @classmethod
    def from_file(cls, path: str | Path) -> "EvalFingerprints":
        """A fingerprints JSON (this format) or a prompts JSONL of the formats ``read_prompts`` takes (``"prompt"``,
        or MT-Bench's ``"turns"``); every turn of a row is excluded, not only the first."""
        path = Path(path)
        if path.suffix == ".json" and path.is_file():
            return cls._from_json(path)
        check_jsonl_file(path, "evaluation set")
        rows = []
        for n, row in jsonl_rows(path):
            texts = _eval_texts(row)
            if texts is None:
                raise InputError(f"evaluation set {path} line {n}: expected {{\"prompt\": ...}} or {{\"turns\": [...]}} "
                                 "JSON with non-empty text: fix that line")
            for text in texts:
                check_text(text, path, n)
            rows += [(f"{row.get('question_id', row.get('id', n))}#{k}", t) for k, t in enumerate(texts)]
        if not rows:
            raise InputError(f"evaluation set {path} has no prompts: pass a .jsonl with one {{\"prompt\": ...}} per line")
        return cls.from_prompts(path.stem, rows)

    @classmethod
    def _from_json(cls, path: Path) -> "EvalFingerprints":
        """A saved fingerprints file; anything else is a one-line `InputError`, not a crash in the filter."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError, OSError):  # JSONDecodeError, UnicodeDecodeError, unreadable
            data = None
        if not isinstance(data, dict) or data.get("format") != FINGERPRINTS_FORMAT:
            raise InputError(f"evaluation set {path} is not a {FINGERPRINTS_FORMAT} JSON file: pass a prompts "
                             ".jsonl, or a file written by EvalFingerprints.save")
        questions = data.get("questions")
        if not isinstance(data.get("name"), str) or not isinstance(questions, list) \
                or not all(_fingerprint_shaped(q) for q in questions):
            raise InputError(f"evaluation set {path}: its \"name\" or \"questions\" are malformed: regenerate it "
                             "with EvalFingerprints.save, or pass the prompts .jsonl")
        return cls(data["name"], questions)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"format": FINGERPRINTS_FORMAT, **asdict(self)}) + "\n")

    def matches(self, sets: dict[int, set[int]], normalised: dict[int, str], cfg: PromptFilter) -> set[int]:
        """Keys whose prompt copies a question exactly, or overlaps one past the Jaccard/containment bars."""
        exact = {q["text_sha256"] for q in self.questions}
        index: dict[int, list[int]] = {}
        for qi, q in enumerate(self.questions):
            for s in q["shingles"]:
                index.setdefault(s, []).append(qi)
        sizes = [len(q["shingles"]) for q in self.questions]
        hits = set()
        for key, s in sets.items():
            if hashlib.sha256(normalised[key].encode()).hexdigest() in exact:
                hits.add(key)
                continue
            shared = Counter(qi for sh in s for qi in index.get(sh, ()))
            for qi, n in shared.items():
                union = len(s) + sizes[qi] - n
                smaller = min(len(s), sizes[qi])  # partial containment of a 1-3 gram text says little
                if (n / union >= cfg.eval_jaccard or n == sizes[qi]  # the whole question inside the prompt
                        or (smaller >= MIN_CONTAINED and n / smaller >= cfg.eval_containment)):
                    hits.add(key)
                    break
        return hits


def _eval_texts(row: object) -> list[str] | None:
    """The prompt (as ``read_prompts`` takes it) and every other turn of an evaluation row; None if it has none."""
    first = prompt_of(row)
    if not isinstance(first, str) or not first.strip():
        return None
    turns = row.get("turns") if isinstance(row.get("turns"), list) else []
    return [first] + [t for t in turns if isinstance(t, str) and t.strip() and t != first]


def _fingerprint_shaped(q: object) -> bool:
    """One saved question: what ``matches`` reads."""
    return (isinstance(q, dict) and isinstance(q.get("text_sha256"), str) and isinstance(q.get("shingles"), list)
            and all(isinstance(x, int) for x in q["shingles"]))


def shipped_eval_fingerprints() -> EvalFingerprints:
    """MT-Bench (all 80 questions, both turns): excluded from every training set by default."""
    return EvalFingerprints.from_file(SHIPPED_FINGERPRINTS)
