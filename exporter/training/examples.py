"""Turn self-distilled answers into head-training examples: (hidden state, targets of every head).

    ex = build_examples(data, num_heads=4)           # ex.targets[i, k] = token the head k must predict
    train, held = split_by_prompt(ex, 0.05, seed=0)  # held-out prompts never seen in training
    vocab = DraftVocab.from_targets(train.targets, size=8192, vocab_size=49152)

Hidden state ``H_j`` of an answer produced token ``g_j`` (the base model's own next token); Medusa head k
(0-based) at that position must predict ``g_{j+1+k}`` (token t+2+k counted from the hidden's own
position t). Targets past the end of the answer are ``IGNORE``. Splitting is by prompt, not by position,
so neighbouring positions of one answer cannot leak from training into the held-out set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import DistilledData

IGNORE = -100


@dataclass
class Examples:
    hidden: np.ndarray  # [N, H] float16 (a view into the distilled data where possible)
    targets: np.ndarray  # [N, K] int64, IGNORE where the answer has ended
    prompt_index: np.ndarray  # [N] int64

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, rows: np.ndarray) -> "Examples":
        return Examples(self.hidden[rows], self.targets[rows], self.prompt_index[rows])


def build_examples(data: DistilledData, num_heads: int) -> Examples:
    """Every position whose head-0 target exists (the last token of an answer only has a base target)."""
    n = len(data.tokens)
    offsets = np.concatenate([[0], np.cumsum(data.seq_lens)])
    seq_of = np.repeat(np.arange(len(data.seq_lens)), data.seq_lens)  # [N] answer of each position
    end = offsets[1:][seq_of]  # [N] exclusive end of the position's answer
    pos = np.arange(n)
    targets = np.full((n, num_heads), IGNORE, np.int64)
    for k in range(num_heads):
        src = pos + 1 + k
        ok = src < end
        targets[ok, k] = data.tokens[src[ok]]
    keep = targets[:, 0] != IGNORE
    return Examples(data.hidden[keep], targets[keep], data.prompt_index[seq_of][keep])


def concat(parts: list[Examples]) -> Examples:
    return Examples(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("hidden", "targets", "prompt_index")))


def heldout_prompts(prompt_ids: np.ndarray, heldout_fraction: float, seed: int) -> np.ndarray:
    """A seeded random share of the distinct ``prompt_ids`` (at least one when the fraction is > 0)."""
    prompts = np.unique(prompt_ids)
    n_held = int(round(len(prompts) * heldout_fraction))
    if heldout_fraction > 0:
        n_held = min(max(n_held, 1), len(prompts) - 1)
    return np.random.default_rng(seed).permutation(prompts)[:max(n_held, 0)]


def split_by_prompt(ex: Examples, heldout_fraction: float, seed: int) -> tuple[Examples, Examples]:
    """The examples of the held-out prompts (``heldout_prompts``) apart from the rest."""
    is_held = np.isin(ex.prompt_index, heldout_prompts(ex.prompt_index, heldout_fraction, seed))
    return ex.subset(np.flatnonzero(~is_held)), ex.subset(np.flatnonzero(is_held))


@dataclass
class DraftVocab:
    """The most frequent target tokens; training computes logits on these lm_head rows only.

    Targets outside the subset are dropped from the loss (not mapped to an "other" bucket: an exact
    bucket logit would need the full projection, which is what the subset avoids). The saved heads are
    unchanged in shape: at decode time they still project onto the full vocabulary.
    """

    ids: np.ndarray  # [V'] int64, sorted full-vocabulary ids
    coverage: float  # share of training targets inside the subset

    @classmethod
    def from_targets(cls, targets: np.ndarray, size: int, vocab_size: int) -> "DraftVocab":
        valid = targets[targets != IGNORE]
        counts = np.bincount(valid, minlength=vocab_size)
        size = min(size, vocab_size)
        ids = np.sort(np.argsort(-counts, kind="stable")[:size])
        return cls(ids.astype(np.int64), float(counts[ids].sum() / max(1, counts.sum())))

    def save(self, path: Path) -> None:
        """``draft_vocab.json``: the subset trained on, which decoding reuses (``heads.restrict_vocab``)."""
        Path(path).write_text(json.dumps({"size": int(len(self.ids)), "coverage": round(self.coverage, 4),
                                          "ids": self.ids.tolist()}) + "\n")

    @classmethod
    def load(cls, path: Path) -> "DraftVocab":
        meta = json.loads(Path(path).read_text())
        return cls(np.asarray(meta["ids"], np.int64), float(meta.get("coverage", 0.0)))

    def remap(self, targets: np.ndarray, vocab_size: int) -> np.ndarray:
        """Full ids -> subset ids; outside the subset (and IGNORE) -> IGNORE."""
        table = np.full(vocab_size, IGNORE, np.int64)
        table[self.ids] = np.arange(len(self.ids))
        out = np.full_like(targets, IGNORE)
        ok = targets != IGNORE
        out[ok] = table[targets[ok]]
        return out
