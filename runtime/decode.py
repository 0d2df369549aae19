"""The decode loop: prefill, then Medusa steps (or plain steps), on any backend.

    for chunk in decode(session, prompt_ids, tree, cfg, stats):   # chunk = tokens final this step
        ...

Each Medusa step: candidates from the heads' top-k at the last accepted node, one forward over the
tree, acceptance, commit of the accepted rows, and the base model's own next token (so every step
yields at least one token). Stopping (EOS, stop strings, max tokens) is the caller's job.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .acceptance import accept_greedy, accept_typical, next_token
from .backends.base import Session
from .tree import Tree


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy (lossless); > 0 = typical acceptance + sampling
    typical_epsilon: float = 0.09
    typical_alpha: float = 0.3
    stop_strings: tuple[str, ...] = ()
    medusa: bool = True
    seed: int | None = None
    chat: bool = True  # apply the chat template when the model has one
    ignore_eos: bool = False  # decode past end-of-sequence tokens up to max_new_tokens (benchmarks, as vLLM's)


@dataclass
class DecodeStats:
    prefill_s: float = 0.0
    step_s: list[float] = field(default_factory=list)  # one per verification forward
    step_tokens: int = 0  # tokens produced by verification steps
    accepted: list[int] = field(default_factory=list)  # draft tokens accepted per step (0 for vanilla)
    finish_reason: str | None = None  # "length" when the KV buffer is full

    @property
    def steps(self) -> int:
        return len(self.step_s)

    def record_step(self, seconds: float, tokens: int) -> None:
        """A step that made ``tokens`` final: accepted drafts plus the base model's own token."""
        self.step_s.append(seconds)
        self.step_tokens += tokens
        self.accepted.append(tokens - 1)

    @property
    def mean_accepted(self) -> float:
        """Mean accepted tokens per step, the one definition used everywhere (CLI, results, bench): tokens a
        verification step produced (accepted draft tokens + the base model's own next token; exactly 1 for
        vanilla decoding) averaged over steps. The prefill's first token is not a step."""
        return self.step_tokens / self.steps if self.steps else 0.0


def candidates(tree: Tree, root: int, medusa_ids: np.ndarray) -> np.ndarray:
    """Node tokens from the pool [root, head0 top-k, head1 top-k, ...] ([K, R] ids at the last accepted node)."""
    pool = np.concatenate(([root], medusa_ids[:, : tree.topk].reshape(-1)))
    return pool[tree.source_index]


@dataclass
class Cursor:
    """Where one sequence's decoding stands: the token to feed next (not yet in the KV cache) and the heads'
    guesses made together with it (None after a step that ran no heads, e.g. a batched lanes step)."""

    root: int
    heads: np.ndarray | None  # [K, R] the heads' top-R at the root's predecessor
    rng: np.random.Generator


def prefill(session: Session, prompt_ids: list[int], medusa: bool, cfg: GenerationConfig,
            rng: np.random.Generator) -> Cursor:
    """Feed the prompt (after whatever the session already holds) in one causal run; the first new token."""
    n, past = len(prompt_ids), session.length
    out = session.run(np.asarray(prompt_ids, np.int64), past + np.arange(n), np.tri(n, dtype=bool), medusa, _temp(cfg))
    session.keep(np.arange(n))
    root = next_token(out, n - 1, cfg.temperature, rng)
    return Cursor(root, out.medusa_ids[n - 1] if out.medusa_ids is not None else None, rng)


def step(session: Session, cursor: Cursor, tree: Tree | None, cfg: GenerationConfig,
         stats: DecodeStats) -> list[int] | None:
    """One verification step: the tree of the heads' candidates (``tree`` and heads at hand) or the root alone;
    the tokens it makes final, or None when the KV buffer is full. A Medusa sequence without heads' guesses
    (after a batched step) takes one plain step on the Medusa graph to get them."""
    medusa = tree is not None and cursor.heads is not None
    tokens = candidates(tree, cursor.root, cursor.heads) if medusa else np.array([cursor.root])
    if session.length + len(tokens) > session.capacity:
        stats.finish_reason = "length"
        return None
    t0 = time.perf_counter()
    depth = tree.depth if medusa else np.zeros(1, np.int64)
    mask = tree.mask if medusa else np.ones((1, 1), bool)
    out = session.run(tokens, session.length + depth, mask, tree is not None, _temp(cfg))
    if not medusa:
        acc_nodes = np.zeros(1, np.int64)
    elif cfg.temperature <= 0:
        acc_nodes = accept_greedy(tree, tokens, out).nodes
    else:
        acc_nodes = accept_typical(tree, tokens, out, cfg.typical_epsilon, cfg.typical_alpha).nodes
    session.keep(acc_nodes)
    last = int(acc_nodes[-1])
    cursor.root = next_token(out, last, cfg.temperature, cursor.rng)
    cursor.heads = out.medusa_ids[last] if out.medusa_ids is not None else None
    new = [int(t) for t in tokens[acc_nodes[1:]]] + [cursor.root]
    stats.record_step(time.perf_counter() - t0, len(new))
    return new


def decode(session: Session, prompt_ids: list[int], tree: Tree | None, cfg: GenerationConfig,
           stats: DecodeStats) -> Iterator[list[int]]:
    """One sequence alone: prefill, then steps until the caller stops reading or the KV buffer is full."""
    tree = tree if cfg.medusa else None
    t0 = time.perf_counter()
    cursor = prefill(session, prompt_ids, tree is not None, cfg, np.random.default_rng(cfg.seed))
    stats.prefill_s = time.perf_counter() - t0
    yield [cursor.root]
    while (new := step(session, cursor, tree, cfg, stats)) is not None:
        yield new


def _temp(cfg: GenerationConfig) -> float:
    return cfg.temperature if cfg.temperature > 0 else 1.0
