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


def decode(session: Session, prompt_ids: list[int], tree: Tree | None, cfg: GenerationConfig,
           stats: DecodeStats) -> Iterator[list[int]]:
    rng = np.random.default_rng(cfg.seed)
    medusa = cfg.medusa and tree is not None
    n = len(prompt_ids)
    t0 = time.perf_counter()
    out = session.run(np.asarray(prompt_ids, np.int64), np.arange(n), np.tri(n, dtype=bool), medusa, _temp(cfg))
    session.keep(np.arange(n))
    root, heads = next_token(out, n - 1, cfg.temperature, rng), out.medusa_ids
    last = n - 1
    stats.prefill_s = time.perf_counter() - t0
    yield [root]
    while True:
        tokens = candidates(tree, root, heads[last]) if medusa else np.array([root])
        if session.length + len(tokens) > session.capacity:
            stats.finish_reason = "length"
            return
        t0 = time.perf_counter()
        depth = tree.depth if medusa else np.zeros(1, np.int64)
        mask = tree.mask if medusa else np.ones((1, 1), bool)
        out = session.run(tokens, session.length + depth, mask, medusa, _temp(cfg))
        if not medusa:
            acc_nodes = np.zeros(1, np.int64)
        elif cfg.temperature <= 0:
            acc_nodes = accept_greedy(tree, tokens, out).nodes
        else:
            acc_nodes = accept_typical(tree, tokens, out, cfg.typical_epsilon, cfg.typical_alpha).nodes
        session.keep(acc_nodes)
        last = int(acc_nodes[-1])
        root, heads = next_token(out, last, cfg.temperature, rng), out.medusa_ids
        new = [int(t) for t in tokens[acc_nodes[1:]]] + [root]
        stats.step_s.append(time.perf_counter() - t0)
        stats.step_tokens += len(new)
        stats.accepted.append(len(new) - 1)
        yield new


def _temp(cfg: GenerationConfig) -> float:
    return cfg.temperature if cfg.temperature > 0 else 1.0
