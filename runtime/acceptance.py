"""Choosing the accepted path of a verified tree, and the bonus token after it.

Greedy (lossless): a node is accepted when its token equals the base argmax at its parent, and
all its ancestors were accepted; the deepest accepted node and its path win.
Typical acceptance (Medusa paper): accept when p_parent(token) > min(epsilon, alpha * exp(-H_parent));
ties between equally long paths go to the higher summed log-probability. With a cut (top_p < 1 or top_k), a token
is also accepted only where it lies within its parent's cut, so no answer holds a token sampling could not draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .backends.base import StepOutput
from .errors import EngineError
from .tree import Tree


@dataclass(frozen=True)
class Acceptance:
    nodes: np.ndarray  # accepted node indices, root first (length = accepted + 1)

    @property
    def accepted(self) -> int:
        return len(self.nodes) - 1


def accept_greedy(tree: Tree, tokens: np.ndarray, out: StepOutput) -> Acceptance:
    """The deepest node whose every ancestor, and itself, holds its parent's argmax (the first such at that depth),
    with its path. Walked in Python on lists: on a CPU the step before has just streamed the weights through the
    caches, and each numpy call on these few-element arrays then costs ~10x its warm time (a vectorised version took
    ~150 us a step, this one ~25)."""
    nxt = out.next_ids[:, 0].tolist()
    toks, parent = tokens.tolist(), tree.parent.tolist()
    depth = [0] + [-1] * (len(toks) - 1)  # -1: not accepted; parents come before their children
    best = 0
    for i in range(1, len(toks)):
        p = parent[i]
        if depth[p] >= 0 and toks[i] == nxt[p]:
            depth[i] = depth[p] + 1
            if depth[i] > depth[best]:
                best = i
    nodes = []
    while best >= 0:
        nodes.append(best)
        best = parent[best]
    return Acceptance(np.asarray(nodes[::-1], np.int64))


def accept_typical(tree: Tree, tokens: np.ndarray, out: StepOutput, epsilon: float, alpha: float,
                   top_p: float = 1.0, top_k: int = 0) -> Acceptance:
    paths = tree.paths_nodes
    parent, child = paths[:, :-1], paths[:, 1:]
    safe_child = np.where(child >= 0, child, 0)
    p = out.input_probs[parent, safe_child]  # p_parent(child token)
    threshold = np.minimum(epsilon, alpha * np.exp(-out.entropy[parent]))
    match = (child >= 0) & (p > threshold)
    if top_p < 1 or top_k:  # and among the ranks its parent's cut keeps (by id: two reductions may round apart)
        ranks = out.next_ids[parent]  # [paths, depth, S]
        kept = np.arange(ranks.shape[-1]) < kept_ranks(out.next_probs, top_p, top_k)[parent][..., None]
        match &= ((ranks == tokens[safe_child][..., None]) & kept).any(axis=-1)
    accepted = np.cumprod(match, axis=1)
    lengths = accepted.sum(axis=1)
    score = (np.log(np.maximum(p, 1e-30)) * accepted).sum(axis=1)
    # Longest first, then the most probable among the longest.
    best = int(np.lexsort((-score, -lengths))[0])
    return Acceptance(paths[best, : lengths[best] + 1])


def kept_ranks(probs: np.ndarray, top_p: float, top_k: int) -> np.ndarray:
    """Per row of ``probs`` (``[rows, S]``, best first, each row's share of the whole vocabulary): how many of the best
    ranks sampling keeps, at least one. top_k 0 keeps all S; top_p keeps the fewest whose sum reaches it (every S where
    the S together hold less: the graph returns no more). vLLM's order: after a top_k within the S ranks, top_p is
    measured on the k kept ranks renormalised (its softmax of the logits top-k left); a top_k past S leaves the
    vocabulary's shares, the k ranks' sum being unknown."""
    k = min(top_k, probs.shape[-1]) if top_k else probs.shape[-1]
    if top_p >= 1:
        return np.full(len(probs), k)
    reach = np.cumsum(probs[:, :k], axis=-1, dtype=np.float64)
    if top_k and top_k <= probs.shape[-1]:
        total = reach[:, -1:]
        with np.errstate(invalid="ignore", divide="ignore"):  # NaN / zero rows: nothing reaches top_p, one rank kept
            reach = np.where(total > 0, reach / total, np.nan)
    return np.minimum((reach < top_p).sum(axis=-1) + 1, k)


def next_token(out: StepOutput, row: int, temperature: float, rng: np.random.Generator, top_p: float = 1.0,
               top_k: int = 0) -> int:
    """Greedy: the base argmax. Sampling: from the base model's top-S at `temperature`, cut to ``top_k`` ranks and to
    the fewest whose probability reaches ``top_p``, renormalised. An EngineError
    when the graph's probabilities are not numbers: weights damaged in a way loading does not see (it checks sizes,
    `verify` the contents) make NaN, and greedy decoding would go on with token 0."""
    if temperature <= 0:
        if not math.isfinite(float(out.next_probs[row, 0])):  # Python, not numpy: see `accept_greedy`
            raise _not_finite()
        return int(out.next_ids[row, 0])
    p = out.next_probs[row].astype(np.float64)
    if top_p < 1 or top_k:
        p = p[:int(kept_ranks(p[None], top_p, top_k)[0])]
    total = p.sum()
    if not np.isfinite(total) or total <= 0:
        raise _not_finite()
    return int(out.next_ids[row, rng.choice(len(p), p=p / total)])


def _not_finite() -> EngineError:
    return EngineError("the model's probabilities are not finite numbers (NaN or infinity): its weights may be "
                       "damaged; check the artifact with `medusa-export verify`, or rebuild it")
