"""The decode loop: prefill, then speculative steps (or plain steps), on any backend.

    for chunk in decode(session, prompt_ids, tree, cfg, stats, spec):   # chunk = tokens final this step
        ...

Each speculative step: candidates from the heads' top-k at the last accepted node and, for greedy requests, a
chain of context drafts (`context_drafts.py`) as many as pay (`speculation.py`), merged into one tree
(`step_tree.py`); one forward over it, acceptance, commit of the accepted rows, and the base model's own next
token (so every step yields at least one token). Stopping (EOS, stop strings, max tokens) is the caller's job.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .acceptance import accept_greedy, accept_typical, next_token
from .backends.base import Session
from .context_drafts import DEFAULT_MAX_DRAFT, ContextIndex, Draft
from .generation_config import GenerationConfig  # scripts and tests also import it from here
from .logprobs import FinalTokens, TokenLogprob, final_tokens, step_logprobs
from .speculation import Speculation
from .step_tree import CONTEXT, HEADS, StepTree
from .tree import Tree


@dataclass
class DecodeStats:
    prefill_s: float = 0.0
    step_s: list[float] = field(default_factory=list)  # one per verification forward
    step_tokens: int = 0  # tokens produced by verification steps
    accepted: list[int] = field(default_factory=list)  # draft tokens accepted per step (0 for vanilla)
    finish_reason: str | None = None  # "length" when the KV buffer is full
    accepted_heads: int = 0  # accepted draft tokens that the heads proposed (shared nodes count here)
    accepted_context: int = 0  # ... that only the context drafts proposed
    heads_steps: int = 0  # steps whose plan verified nodes of the heads' tree
    context_rows: int = 0  # context draft rows verified
    last_rows: int = 0  # rows of the last verification step
    draft_depth: int = 0  # the deepest draft position any step verified (heads' tree or context drafts)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # the prompt's tokens but its first, when scored
    cached_tokens: int = 0  # prompt tokens whose KV rows an earlier request left (`prefix_reuse.py`): not prefilled

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
    context: ContextIndex | None = None  # the sequence so far, root included (greedy speculation only)
    shadow: tuple[StepTree, list[int]] | None = None  # heads' guesses not verified, and the tokens that came after
    draft_shadows: list[tuple[Draft, int, list[int]]] = field(default_factory=list)  # drafts' unverified tokens
    first: FinalTokens | None = None  # the token the prompt's last row chose (with its logprobs when asked for)

    def advance(self, new: list[int], spec: Speculation) -> None:
        """``new`` (ending with the new root) became final: the lookup index grows, unverified heads' guesses and
        drafts are scored."""
        if self.context is not None:
            self.context.extend(new)
        score_shadow(self, new, spec)
        score_draft_shadows(self, new, spec)

    def propose(self, spec: Speculation, max_tokens: int) -> Draft | None:
        """The draft this step weighs (`Speculation.propose`); the other source's is watched."""
        best, other = spec.propose_both(self.context, max_tokens)
        if other is not None:
            self.watch_draft(other)
        return best

    def take_draft(self, draft: Draft, n: int) -> Draft | None:
        """``draft``'s first ``n`` tokens, for this step to verify (None for none); the rest is watched."""
        self.watch_draft(draft, n)
        return Draft(draft.tokens[:n], draft.ngram, draft.kind) if n else None

    def watch_draft(self, draft: Draft, start: int = 0) -> None:
        """This step verifies ``draft``'s first ``start`` tokens (or none of another source's): the next two are
        scored against the tokens that come, so that a kind, or a depth, left out where rows are dear stays measured
        (a step then verifies it again once it pays). Two, so a score comes within a step or two."""
        if start < len(draft.tokens) and len(self.draft_shadows) < MAX_DRAFT_SHADOWS:
            self.draft_shadows.append((Draft(draft.tokens[:start + 2], draft.ngram, draft.kind), start, []))


MAX_DRAFT_SHADOWS = 4  # drafts watched at once by a sequence (each is decided within a step or two)


def uses_context(cfg: GenerationConfig) -> bool:
    return cfg.medusa and cfg.context_drafts and cfg.temperature <= 0


def prefill(session: Session, prompt_ids: list[int], medusa: bool, cfg: GenerationConfig,
            rng: np.random.Generator, start: int = 0, stats: DecodeStats | None = None) -> Cursor:
    """Feed the prompt from ``start`` (the session holds the tokens before it) in one causal run; the first new
    token."""
    return start_cursor(prompt_ids, feed(session, prompt_ids[start:], medusa, cfg, stats=stats), -1, cfg, rng)


def feed(session: Session, tokens: list[int], medusa: bool, cfg: GenerationConfig, after: int | None = None,
         stats: DecodeStats | None = None):
    """Prompt tokens after the session's, in one causal run, kept; the outputs of their last row (a prefill reads
    only those; a prompt chunk before the last, none). Scoring the prompt (``cfg.prompt_logprobs``, with ``stats``):
    every row's outputs, and ``after``, the prompt token after these (None at the prompt's end), as one extra row that
    is not kept, so the run holds the log-probability of each token but its first (`stats.prompt_logprobs`)."""
    scored = cfg.prompt_logprobs is not None and stats is not None
    run = [*tokens, after] if scored and after is not None else list(tokens)
    n, past = len(run), session.length
    out = session.run(np.asarray(run, np.int64), past + np.arange(n), np.tri(n, dtype=bool), medusa, _temp(cfg),
                      out_rows=None if scored else np.array([n - 1]))
    session.keep(np.arange(len(tokens)))
    if scored:  # token j of the run was read by row j - 1
        stats.prompt_logprobs += step_logprobs(out, list(range(n)), run[1:], cfg.prompt_logprobs)
    return out


def start_cursor(prompt_ids: list[int], out, row: int, cfg: GenerationConfig, rng: np.random.Generator) -> Cursor:
    """The cursor after a prompt whose last row is ``row`` of ``out``."""
    root = next_token(out, row, cfg.temperature, rng, cfg.top_p, cfg.top_k)
    heads = out.medusa_ids[row] if getattr(out, "medusa_ids", None) is not None else None
    return Cursor(root, heads, rng, ContextIndex([*prompt_ids, root]) if uses_context(cfg) else None,
                  first=final_tokens(out, [row], [root], cfg.logprobs))


def plan(cursor: Cursor, tree: Tree | None, spec: Speculation, room: int, max_paths: int | None,
         whole_tree: bool = False) -> StepTree:
    """This step's candidates, the best by expected tokens per second (`speculation.py`) of: the root alone, a chain of
    context drafts, the heads' tree with or without drafts merged in; within ``room`` rows and the graph's
    ``max_paths`` (paths it verifies exactly). With ``tree`` every step runs the Medusa graph, whatever the plan:
    switching graphs costs more than the heads (ONNX Runtime's idle threads of the graph that ran last spin for a
    while and take the cores from the next one: measured twice a step's time). ``whole_tree``: the Medusa graph takes
    only its whole tree (a TensorRT engine's fixed-shape step profile), so a step with the heads verifies exactly it."""
    root = StepTree.chain(cursor.root, [])
    heads = StepTree.heads(tree, candidates(tree, cursor.root, cursor.heads)) if (
        tree is not None and cursor.heads is not None and tree.num_nodes <= room) else None
    if whole_tree and heads is not None and cursor.context is None:
        return heads  # sampling, or no drafts to weigh against it
    draft = cursor.propose(spec, min(DEFAULT_MAX_DRAFT, room - 1)) if cursor.context is not None else None
    if heads is None and draft is None:
        return root  # nothing to weigh (vanilla decoding, or no draft this step)
    q = spec.rates.cumulative(draft.rate_kind, len(draft.tokens)) if draft else []
    upto = [0.0]  # upto[n]: expected accepted tokens of the draft's first n (lists: see `AcceptanceRates.conditional`)
    for x in q:
        upto.append(upto[-1] + x)
    options = [(1.0 + upto[n], n + 1, n, False) for n in range(len(q) + 1)]  # (tokens, rows, drafts, heads)
    if heads is not None:
        p_node = spec.node_rates(tree)
        heads_tokens = sum(p_node)
        walked = heads.shared(draft.tokens) if draft else []
        paths = heads.num_paths + (0 if walked and heads.is_leaf(walked[-1]) else 1)  # once the draft leaves the tree
        for n in range(1 if whole_tree else len(q) + 1):  # a whole-tree backend verifies the heads' tree alone
            k = min(n, len(walked))
            if n > k and (max_paths is not None and paths > max_paths or tree.num_nodes + n - k > room):
                break
            gain = sum(max(q[j] - p_node[walked[j]], 0.0) for j in range(k)) + upto[n] - upto[k]
            options.append((heads_tokens + gain, tree.num_nodes + n - k, n, True))
    most = max(rows for _, rows, _, _ in options)
    t = spec.alone_table(tree is not None, most)
    best = options[-1] if whole_tree and heads is not None else max(options, key=lambda o: o[0] / t[o[1]])
    if heads is not None and cursor.context is not None:
        weigh_both_graphs(spec, options, best, t)
    if best[1] > 1 and (tree is None or not whole_tree) and spec.alone_cost[tree is not None].plain_due():
        best = options[0]  # the root alone, to measure what a one-row step costs (`speculation.PLAIN_MIN`)
    tokens, rows, n, use_heads = best
    if draft is not None:
        cursor.watch_draft(draft, n)
    if use_heads:
        return heads.with_draft(draft.tokens[:n], draft.rate_kind) if n else heads
    if heads is not None and cursor.shadow is None:
        cursor.shadow = (heads, [])  # scored against the tokens that follow, so the heads' rates stay measured
    return StepTree.chain(cursor.root, draft.tokens[:n], draft.rate_kind) if n else root


def weigh_both_graphs(spec: Speculation, options: list[tuple], best: tuple, t: list[float]) -> None:
    """A Medusa-graph step's plan ``best`` (by this graph's step costs ``t``) next to the best of its ``options``
    without the heads by the vanilla graph's step costs: what `Speculation.heads_for` weighs. Only once the vanilla
    graph's cost is measured: borrowed from the Medusa graph, it would make the heads win by construction."""
    if not spec.alone_cost[False].measured:
        return
    t_vanilla = spec.alone_table(False, len(t) - 1)
    alone = max((o for o in options if not o[3]), key=lambda o: o[0] / t_vanilla[o[1]])
    spec.record_paired(best[0], t[best[1]], alone[0], t_vanilla[alone[1]])


def step(session: Session, cursor: Cursor, tree: Tree | None, cfg: GenerationConfig, stats: DecodeStats,
         spec: Speculation, max_paths: int | None = None, whole_tree: bool = False) -> FinalTokens | None:
    """One verification step; the tokens it makes final, or None when the KV buffer is full."""
    room = session.capacity - session.length
    if room < 1:
        stats.finish_reason = "length"
        return None
    # Sampling: the heads' whole tree at every step (typical acceptance draws from the rng per verified tree), so a
    # seed gives one answer whatever this process has measured.
    p = plan(cursor, tree, spec, room, max_paths, whole_tree or cfg.temperature > 0)
    t0 = time.perf_counter()
    out = session.run(p.tokens, session.length + p.depth, p.mask, tree is not None, _temp(cfg))
    acc_nodes = accept(p, out, cfg)
    session.keep(acc_nodes)
    seconds = time.perf_counter() - t0
    spec.alone_cost[tree is not None].record(p.num_nodes, seconds)
    stats.last_rows = p.num_nodes
    return finish_step(cursor, p, acc_nodes, out, cfg, stats, spec, seconds)


def accept(p: StepTree, out, cfg: GenerationConfig) -> np.ndarray:
    """The accepted nodes of a verified plan, root first (greedy, or typical acceptance when sampling)."""
    if p.num_nodes == 1:
        return np.zeros(1, np.int64)
    if cfg.temperature <= 0:
        return accept_greedy(p, p.tokens, out).nodes
    return accept_typical(p, p.tokens, out, cfg.typical_epsilon, cfg.typical_alpha, cfg.top_p, cfg.top_k).nodes


def finish_step(cursor: Cursor, p: StepTree, acc_nodes: np.ndarray, out, cfg: GenerationConfig, stats: DecodeStats,
                spec: Speculation, seconds: float) -> FinalTokens:
    """After a verification (one-sequence or batched step) whose accepted rows are committed: the next root, the
    tokens made final, and what the step teaches about the drafts and the heads."""
    last = int(acc_nodes[-1])
    cursor.root = next_token(out, last, cfg.temperature, cursor.rng, cfg.top_p, cfg.top_k)
    medusa_ids = getattr(out, "medusa_ids", None)  # a lanes step runs no heads
    cursor.heads = medusa_ids[last] if medusa_ids is not None else None
    accepted = acc_nodes.tolist()
    tokens = p.tokens.tolist()
    new = [tokens[i] for i in accepted[1:]] + [cursor.root]
    stats.record_step(seconds, len(new))
    record_sources(p, accepted, new, spec, stats)
    cursor.advance(new, spec)
    return final_tokens(out, accepted, new, cfg.logprobs)


def score_shadow(cursor: Cursor, new: list[int], spec: Speculation) -> None:
    """Once the tokens after an unverified heads' tree are known: which of its nodes greedy would have accepted."""
    if cursor.shadow is None:
        return
    heads, after = cursor.shadow
    after += new
    if len(after) < heads.depth.max():
        return
    matched = np.zeros(heads.num_nodes, bool)
    matched[0] = True
    for i in range(1, heads.num_nodes):  # parents first; siblings hold distinct tokens: one match per depth
        matched[i] = matched[heads.parent[i]] and heads.tokens[i] == after[heads.depth[i] - 1]
    spec.record_heads(np.flatnonzero(matched[1:]) + 1)
    cursor.shadow = None


def score_draft_shadows(cursor: Cursor, new: list[int], spec: Speculation) -> None:
    """Each watched draft that the tokens since decide (its first wrong token, or all of it): its unverified tokens
    count as if verified, if the step verified all before them. Else a kind or a depth priced out by bad luck, or by
    text that changed, stayed out for good: no step verified it, so nothing measured it again."""
    pending = []
    for draft, start, after in cursor.draft_shadows:
        after += new
        agreed = agreeing(draft.tokens, after)
        if agreed < len(after) or agreed == len(draft.tokens):
            if agreed >= start:
                spec.rates.record(draft.rate_kind, len(draft.tokens), agreed, start)
        else:
            pending.append((draft, start, after))
    cursor.draft_shadows = pending


def record_sources(p: StepTree, accepted: list[int], new: list[int], spec: Speculation, stats: DecodeStats) -> None:
    """Accepted tokens by source, and what the step teaches about the drafts' acceptance (``accepted``: the accepted
    nodes, root first)."""
    if p.num_nodes == 1:  # the root alone: no drafts, nothing to count
        return
    source = p.source.tolist()
    kinds = [source[i] for i in accepted[1:]]
    stats.draft_depth = max(stats.draft_depth, p.paths_nodes.shape[1] - 1)  # paths are padded to the deepest
    stats.accepted_heads += kinds.count(HEADS)
    stats.accepted_context += kinds.count(CONTEXT)
    stats.context_rows += source.count(CONTEXT)
    if HEADS in source:
        stats.heads_steps += 1
        spec.record_heads([i for i in accepted if source[i] == HEADS])
    if p.draft:
        spec.rates.record(p.kind, p.drafted, agreeing(p.draft, new))


def agreeing(draft: list[int], new: list[int]) -> int:
    """How many leading draft tokens the step's final tokens confirm."""
    return next((j for j, (a, b) in enumerate(zip(draft, new)) if a != b), min(len(draft), len(new)))


def decode(session: Session, prompt_ids: list[int], tree: Tree | None, cfg: GenerationConfig,
           stats: DecodeStats, spec: Speculation | None = None, max_paths: int | None = None,
           whole_tree: bool = False) -> Iterator[list[int]]:
    """One sequence alone: prefill, then steps until the caller stops reading or the KV buffer is full. ``spec``:
    what earlier requests measured (a `Generator` shares one, and chooses ``tree`` with `Speculation.heads_for`),
    else measured from this one only."""
    tree = tree if cfg.medusa else None
    spec = spec or Speculation()
    t0 = time.perf_counter()
    cursor = prefill(session, prompt_ids, tree is not None, cfg, np.random.default_rng(cfg.seed), stats=stats)
    stats.prefill_s = time.perf_counter() - t0
    yield cursor.first
    while (new := step(session, cursor, tree, cfg, stats, spec, max_paths, whole_tree)) is not None:
        yield new


def _temp(cfg: GenerationConfig) -> float:
    return cfg.temperature if cfg.temperature > 0 else 1.0
