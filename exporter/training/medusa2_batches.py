"""Medusa-2's training sequences: each self-distilled answer after its prompt, the held-out split Medusa-1 uses,
seeded subsets, and length-bucketed batches under a sequence and token budget."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import DistilledData
from .examples import IGNORE, heldout_prompts


@dataclass
class Sequence:
    ids: np.ndarray  # prompt + answer token ids
    first: int  # index of the hidden state that produced answer token 0 (the prompt's last position)
    targets: np.ndarray  # [A, K] head targets per answer position (IGNORE past the answer)
    prompt_index: int


def answer_sequences(data: DistilledData, prompts: list[str], tokenizer, num_heads: int, heldout_fraction: float,
                     seed: int) -> tuple[list[Sequence], list[Sequence]]:
    """One sequence per self-distilled answer; held-out prompts exactly as Medusa-1 splits them."""
    # Medusa-1 draws the held-out share from the prompts with a training example: answers of 2+ tokens.
    held_prompts = set(heldout_prompts(data.prompt_index[data.seq_lens >= 2], heldout_fraction, seed).tolist())
    offsets = np.concatenate([[0], np.cumsum(data.seq_lens)])
    train, heldout = [], []
    for a, pi in enumerate(data.prompt_index.tolist()):
        answer = data.tokens[offsets[a]:offsets[a + 1]]
        prompt = np.asarray(tokenizer.encode_prompt(prompts[pi]), np.int64)
        targets = np.full((len(answer), num_heads), IGNORE, np.int64)
        for k in range(num_heads):
            targets[:max(0, len(answer) - 1 - k), k] = answer[1 + k:]
        seq = Sequence(np.concatenate([prompt, answer]), len(prompt) - 1, targets, pi)
        (heldout if pi in held_prompts else train).append(seq)
    return train, heldout


def seeded_subset(seqs: list, limit: int | None, seed: int) -> list:
    """At most ``limit`` items, drawn at random (seeded) and kept in their order."""
    if not limit or limit >= len(seqs):
        return seqs
    keep = np.sort(np.random.default_rng(seed).choice(len(seqs), limit, replace=False))
    return [seqs[i] for i in keep]


def epoch_batches(seqs: list, size: int, max_tokens: int, seed: int, pool_batches: int = 16) -> list[list[int]]:
    """Seeded shuffle, then sequences of similar length batched together within pools of ``pool_batches``
    batches (padded positions cost as much as real ones), the batches in shuffled order. A batch holds at most
    ``size`` sequences and ``max_tokens`` padded tokens (a longer sequence goes alone)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(seqs))
    pool = size * pool_batches
    batches: list[list[int]] = []
    for s in range(0, len(order), pool):
        batch: list[int] = []
        for i in sorted(order[s:s + pool].tolist(), key=lambda i: len(seqs[i].ids)):  # ascending: i is the longest
            if batch and (len(batch) == size or (len(batch) + 1) * len(seqs[i].ids) > max_tokens):
                batches.append(batch)
                batch = []
            batch.append(i)
        batches.append(batch)
    return [batches[i] for i in rng.permutation(len(batches))]
