"""How many draft rows a step should verify: acceptance rates and step cost, both measured while decoding.

    spec = Speculation()
    draft = spec.propose(context_index, 8)                       # prompt lookup, or the artifact's corpus table
    q = spec.rates.cumulative(draft.rate_kind, len(draft.tokens))   # P(the first j+1 drafts are all accepted)
    n = spec.batched_cost.worth([q], expected=8, rows=8, limit=8)[0]   # how many of them pay in a batched step
    spec.rates.record(draft.rate_kind, proposed=n, accepted=a)        # after the step
    spec.batched_cost.record(rows, seconds)

A step takes the drafts, most probable first, that maximise its expected tokens per second ``(E + sum q_j) /
t(R + n)``: ``E`` the tokens it makes without them, ``q_j`` a draft's probability of being accepted (with all
before it), ``t(R)`` the step's time at ``R`` rows. On a CPU a row costs a
few percent of a one-sequence step, so when a sequence runs alone most drafts pay; in a full batch the step makes
one token per sequence and only confident drafts do (docs/serving.md, "Speculation under load").

The step time ``t(R)`` is measured on the steps this process runs (`StepCost`); rates are counted per matched n-gram length and depth, conditional on the parent being
accepted. Both start from priors measured on the default model (docs/results.md).
"""

from __future__ import annotations

import threading

import numpy as np

from .context_drafts import DEFAULT_MAX_DRAFT, ContextIndex, Draft
from .corpus_drafts import MAX_NGRAM, NUM_KINDS, SHARE_CLASSES, CorpusTable, rate_kind

# Priors until the process has measured its own. Rates: prompt lookup on the default model accepted its first
# draft 30 % of the time after a 1-token match, 55 % after 2, 70 % after 3 (deeper drafts ~70-85 % given their
# parent). Cost: a tree node added ~1.5-2.6 ms to a ~27-34 ms fp32 step.
PRIOR_FIRST = {1: 0.3, 2: 0.55, 3: 0.7}
PRIOR_DEEPER = 0.7
# The ShareGPT table's first draft on the default model's answers to held-out prompts (train_prompts.jsonl
# [100:160]), by matched n-gram length and share class (below .25, .25-.5, above): ~.12-.15 / .25-.3 / .35-.45.
PRIOR_CORPUS_FIRST = {n: (0.13, 0.27, 0.4) for n in range(1, MAX_NGRAM + 1)}
PRIOR_CORPUS_DEEPER = 0.55
PRIOR_WEIGHT = 10.0  # the priors count as this many observations
RATE_WINDOW = 400.0  # a rate follows about its kind's last this many drafts at that depth (the text moves)
PRIOR_ROW_SHARE = 0.06  # one more row, as a share of a one-row step
# A step without drafts (the root alone; in a lanes step, its sequences' roots and prompt chunks) is the one row count
# that measuring others never reaches: a count above the largest measured is estimated cheap, gets chosen and so
# measured, but a count below the smallest measured is estimated from it (less the prior share), which can be far
# dearer than it is, and then never runs once drafts are verified from the first steps on. So a step runs without
# drafts while its count has fewer than PLAIN_MIN measurements, and again once PLAIN_EVERY steps have passed
# without one (the machine's speed moves). Measured on int4 rows16: one row 3.8 ms, two 5.2 ms (+37 %, not the
# prior's 6 %); without this a fresh process verified drafts at nearly every step and ran 0.71-0.84x its vanilla speed.
PLAIN_MIN = 3
PLAIN_EVERY = 64
# A count of more rows that no step has run for STALE_AFTER steps is priced from the nearest fresh count below (never
# above its own mean) and its mean starts again, from at most that price, when it next runs. Else one slow step (a
# cold cache, a busy neighbour) could price that count, and every larger one (never cheaper than a smaller), out of
# all later plans for good: never chosen, never measured again (a first 2-row step of a chain-1 tree measured at
# 45 ms next to 3 ms plain steps kept the heads unverified for a whole run). A count dear in truth costs two steps
# each STALE_AFTER to find out again.
STALE_AFTER = 4 * PLAIN_EVERY
# Requests: once the paired steps decide, one in EXPLORE_EVERY runs the other graph; each exploration that leaves the
# choice as it was doubles the interval, up to MAX_EXPLORE_EVERY, and a changed choice starts again from EXPLORE_EVERY.
# Exploring a graph that loses costs its difference on that request: on the default artifact (the heads' graph about
# 3 % fewer expected tokens per second, a request on it 11 % dearer a step) one in eight cost 1.1 % of tok/s.
EXPLORE_EVERY = 8
MAX_EXPLORE_EVERY = 64
PRIOR_HEADS_NODE = 0.3  # a heads' node at depth d: accepted 0.3 ** d of the time (the shipped heads' first: ~0.3)
PAIRED_DECAY = 0.995  # per step: the two graphs' expected rates follow the last few hundred Medusa-graph steps
MIN_PAIRED_STEPS = 64  # Medusa-graph steps weighed both ways before they decide which graph runs a request


class AcceptanceRates:
    """Conditional acceptance of drafts by kind (`Draft.rate_kind`: a context draft's matched n-gram length, or a
    corpus draft's class) and depth."""

    def __init__(self, max_draft: int = DEFAULT_MAX_DRAFT) -> None:
        prior = np.full((NUM_KINDS, max_draft), PRIOR_DEEPER)
        prior[:, 0] = [PRIOR_FIRST.get(n, PRIOR_FIRST[max(PRIOR_FIRST)]) for n in range(NUM_KINDS)]
        for n, firsts in PRIOR_CORPUS_FIRST.items():
            for share, first in zip((0.0, *SHARE_CLASSES), firsts):
                prior[rate_kind(n, share)] = [first, *[PRIOR_CORPUS_DEEPER] * (max_draft - 1)]
        # Counts and conditional rates as lists, read and updated every step in Python: numpy calls on a few elements
        # cost ~10x their warm time right after a step has streamed the weights through the CPU's caches.
        accepted, proposed = prior * PRIOR_WEIGHT, np.full_like(prior, PRIOR_WEIGHT)
        self._accepted, self._proposed = accepted.tolist(), proposed.tolist()
        self.conditional = (accepted / proposed).tolist()
        self.lock = threading.Lock()

    @property
    def accepted(self) -> np.ndarray:
        """[kinds, depth] accepted drafts, the prior's included (a copy)."""
        return np.array(self._accepted)

    @property
    def proposed(self) -> np.ndarray:
        """[kinds, depth] verified drafts, the prior's included (a copy)."""
        return np.array(self._proposed)

    def cumulative(self, kind: int, n: int) -> list[float]:
        """[n] probability that drafts 0..j of a draft of this kind are all accepted."""
        out, p = [], 1.0
        for rate in self.conditional[kind][:n]:
            p *= rate
            out.append(p)
        return out

    def record(self, kind: int, proposed: int, accepted: int, start: int = 0) -> None:
        """A step verified ``proposed`` drafts of a chain; its first ``accepted`` were right (each was tried only
        if its parent was accepted). ``start``: depths before it are counted elsewhere (a draft's tail, scored after
        the step verified its head: `decode.score_draft_shadows`)."""
        with self.lock:
            acc, prop, rates = self._accepted[kind], self._proposed[kind], list(self.conditional[kind])
            for j in range(start, min(accepted + 1, proposed, len(prop))):
                prop[j] += 1
                acc[j] += j < accepted
                if prop[j] > RATE_WINDOW:  # older drafts weigh less and less
                    acc[j], prop[j] = acc[j] * RATE_WINDOW / prop[j], RATE_WINDOW
                rates[j] = acc[j] / prop[j]
            self.conditional[kind] = rates  # whole: a reader without the lock sees the old row or the new one


class StepCost:
    """Step seconds by rows, measured: a running mean per row count, unmeasured counts estimated from the nearest
    measured one below (a row adds ``PRIOR_ROW_SHARE`` of it), never less than a smaller count's. A table, not a
    line: on the measured CPU 5 rows cost 1.23x one row but 8 rows 1.71x (another matmul kernel takes over)."""

    def __init__(self, max_rows: int = 256, plain_steps: bool = True, clock: list[int] | None = None) -> None:
        self.seconds = [0.0] * (max_rows + 1)  # lists, as `AcceptanceRates`' counts: updated and read every step
        self.count = [0] * (max_rows + 1)  # measurements of each count
        self.samples = [0] * (max_rows + 1)  # ... in its running mean (since it last went stale)
        self.plain_steps = plain_steps  # False: never asks for a step without drafts (`plain_due`)
        self.records = 0  # steps recorded
        # Steps that age this table's counts: its own, and those of any table sharing the clock. The two graphs'
        # tables share one, so that requests on the vanilla graph age the Medusa graph's tree counts too: a tree
        # priced out by one slow step would else keep every request off that graph and never be measured again.
        self.clock = [0] if clock is None else clock
        self.last = [0] * (max_rows + 1)  # ``clock`` at the last step of each row count
        self.lock = threading.Lock()

    def record(self, rows: int, seconds: float) -> None:
        if 1 <= rows < len(self.seconds):
            with self.lock:  # a mean of the first ten, then an exponential one (a busier machine is followed)
                if self.stale(rows):  # the mean starts again, from at most its price now: the step that comes
                    seconds = min(seconds, self.table(rows)[rows])  # back to a count may be a cold one again
                    self.samples[rows] = 0
                n = self.samples[rows] = self.samples[rows] + 1
                self.seconds[rows] += (seconds - self.seconds[rows]) / min(n, 10)
                self.count[rows] += 1  # after the seconds: `table` reads without the lock, and a count must have them
                self.records += 1
                self.clock[0] += 1  # a lost update between two tables' threads only delays an ageing by a step
                self.last[rows] = self.clock[0]

    @property
    def measured(self) -> bool:
        """Whether any row count has been measured."""
        return self.records > 0

    def stale(self, rows: int) -> bool:
        """Whether count ``rows`` (of more than one row) was measured, but not in the last ``STALE_AFTER`` steps."""
        return rows > 1 and self.count[rows] > 0 and self.clock[0] - self.last[rows] >= STALE_AFTER

    def plain_due(self, rows: int = 1) -> bool:
        """Whether the next step should run without drafts, ``rows`` rows, to measure that count (``PLAIN_MIN``,
        ``PLAIN_EVERY``). Staleness counts steps of any size, and those of tables sharing the clock: a count that
        comes back less often than once in ``PLAIN_EVERY`` steps (a lanes step's odd prompt chunk) runs without drafts
        each time."""
        if not self.plain_steps or not 1 <= rows < len(self.count):
            return False
        return self.count[rows] < PLAIN_MIN or self.clock[0] - self.last[rows] >= PLAIN_EVERY

    def table(self, upto: int) -> list[float]:
        """[upto + 1] estimated seconds of a step of r rows (index 0 unused). Counts past ``max_rows`` are never
        measured, only estimated: a heads' tree may have more nodes (up to 1,025) and its steps are weighed too."""
        seconds = self.seconds
        measured = min(upto, len(self.count) - 1)
        count, last, cutoff = self.count, self.last, self.clock[0] - STALE_AFTER  # `stale`, inlined: every step
        if not any(count[r] and (r == 1 or last[r] > cutoff) for r in range(1, measured + 1)):
            cutoff = -1  # all stale (a whole-tree backend measures one count): what was measured beats the prior
        fresh = [r <= measured and count[r] > 0 and (r == 1 or last[r] > cutoff) for r in range(upto + 1)]
        known = [r for r in range(1, measured + 1) if fresh[r]]
        base_r, base_t = (known[0], seconds[known[0]]) if known else (1, 0.03)
        t, slowest = [0.0], 0.0
        for r in range(1, upto + 1):
            if fresh[r]:
                base_r, base_t = r, seconds[r]
                estimate = base_t
            else:  # from the nearest fresh count below (or the first fresh one, above, scaled down)
                estimate = base_t * (1 + PRIOR_ROW_SHARE * (r - base_r)) if r > base_r else \
                    base_t / (1 + PRIOR_ROW_SHARE * (base_r - r))
                if r <= measured and count[r]:  # stale: never dearer than measured (a price too low is run, so
                    estimate = min(estimate, seconds[r])  # corrected; one too high would never be)
            slowest = max(slowest, estimate)  # never less than a smaller count's
            t.append(slowest)
        return t

    def worth(self, chains: list[np.ndarray], expected: float, rows: int, limit: int) -> list[int]:
        """How many rows of each chain (``chains[i][j]``: probability that its drafts 0..j are all accepted) to add
        to a step of ``rows`` rows that already expects ``expected`` tokens, at most ``limit`` more: the most probable
        drafts first, as many as maximise expected tokens per second."""
        room = len(self.seconds) - 1 - rows  # the table's largest count bounds a step (a larger one takes no drafts)
        order = sorted((-q, j, i) for i, c in enumerate(chains) for j, q in enumerate(c))[:max(min(limit, room), 0)]
        if not order:
            return [0] * len(chains)
        t = self.table(rows + len(order))
        gains = expected + np.cumsum([-neg_q for neg_q, _, _ in order])
        rates = np.concatenate(([expected / t[rows]], gains / np.asarray(t[rows + 1:rows + 1 + len(order)])))
        best = int(np.argmax(rates))  # how many of ``order`` to take; parents sort before their children
        take = [0] * len(chains)
        for _, j, i in order[:best]:
            take[i] = max(take[i], j + 1)
        return take


class Speculation:
    """What one backend's decoding has measured: draft acceptance, and step cost alone and batched."""

    def __init__(self) -> None:
        self.rates = AcceptanceRates()
        clock = [0]  # one-sequence steps on either graph: both tables age together (`StepCost.clock`)
        self.alone_cost = {True: StepCost(clock=clock), False: StepCost(clock=clock)}  # by graph: Medusa, vanilla
        self.requests = 0
        self.choice: bool | None = None  # the graph the paired steps chose last (True: the heads'), None before
        self.explore_every = EXPLORE_EVERY  # requests between explorations of the other graph, once chosen
        self.next_explore = 0  # the request count at which the next exploration runs
        self.batched_cost = StepCost()
        self.lock = threading.Lock()
        self.node_hits: list[float] | None = None  # per node of the heads' tree: times accepted
        self.heads_steps = 0.0  # steps that verified the heads' tree
        self.corpus: CorpusTable | None = None  # the artifact's corpus-draft table, if it has one
        # The same steps weighed on both graphs (`record_paired`), decayed: expected tokens and seconds of each
        # Medusa-graph step's plan, of the best drafts-only plan for it on the vanilla graph, and their number.
        self.paired = [0.0, 0.0, 0.0, 0.0, 0]

    def propose(self, context: ContextIndex, max_tokens: int) -> Draft | None:
        """The draft a sequence's step should weigh: the context's (prompt lookup) or the corpus table's, whichever
        expects more accepted tokens by the rates measured so far."""
        return self.propose_both(context, max_tokens)[0]

    def propose_both(self, context: ContextIndex, max_tokens: int) -> tuple[Draft | None, Draft | None]:
        """`propose`'s draft, and the other source's, if any: a step scores it without verifying it, so that a kind
        that keeps losing here stays measured."""
        drafts = [context.propose(max_tokens)]
        if self.corpus is not None:
            drafts.append(self.corpus.propose(context.tokens, max_tokens))
        ranked = sorted((d for d in drafts if d is not None), reverse=True,  # stable: a tie keeps the context's
                        key=lambda d: sum(self.rates.cumulative(d.rate_kind, len(d.tokens)))) + [None, None]
        return ranked[0], ranked[1]

    def heads_for(self, tree):
        """The heads' tree for a new request when the heads are expected to pay on this machine, else None (the
        vanilla graph, with drafts only); now and then the other choice, so that both graphs stay measured: every
        other request until both are, then the ``EXPLORE_EVERY``-th, the interval doubling (up to
        ``MAX_EXPLORE_EVERY``) while explorations leave the choice as it was. Once ``MIN_PAIRED_STEPS`` Medusa-graph
        steps were weighed both ways and the vanilla graph's step cost is measured, the expected tokens per second of
        the same steps on each graph decide (drafts ride on both, and the Medusa graph computes its heads on every
        row); before that, the heads' tree alone against a plain step. The same steps, not each graph's own requests:
        one answer draws several times as many tokens per step as another, which would swamp the difference.
        Decided per request: switching graphs between steps costs more than it saves (docs/speculation.md)."""
        if tree is None:
            return None
        with self.lock:  # a whole record, not one half-updated by a step on another thread
            self.requests += 1
            medusa_tokens, medusa_s, vanilla_tokens, vanilla_s, steps = self.paired
            measured = steps >= MIN_PAIRED_STEPS and self.alone_cost[False].measured
            if measured:  # tokens per second on each graph, compared without dividing
                pays = medusa_tokens * vanilla_s >= vanilla_tokens * medusa_s
                explore = self._explore(pays)
            else:
                pays = self._tree_beats_plain(tree)
                explore = self.requests % 2 == 0  # until both graphs are measured: a few requests, not eight, decide
        return tree if pays != explore else None

    def heads_without_drafts(self, tree):
        """The heads' tree for a greedy request that takes no drafts (context drafts off) when it is expected to beat
        plain steps on this machine, else None. Not counted as a request of `heads_for`, whose comparison is of the
        heads next to drafts: such a request has none, and got plain decoding where the heads beside drafts lost."""
        if tree is None:
            return None
        with self.lock:
            pays = self._tree_beats_plain(tree)
        return tree if pays else None

    def greedy_tree(self, tree, context_drafts: bool):
        """The tree a greedy request runs: `heads_for` with context drafts, `heads_without_drafts` without."""
        return self.heads_for(tree) if context_drafts else self.heads_without_drafts(tree)

    def _tree_beats_plain(self, tree) -> bool:
        """Whether the heads' tree is expected to give more tokens per second on the Medusa graph than a one-row step
        on the vanilla graph (by the measured node rates and step costs; under the lock)."""
        n = tree.num_nodes
        return sum(self.node_rates(tree)) / self.alone_table(True, n)[n] >= 1 / self.alone_table(False, 1)[1]

    def _explore(self, pays: bool) -> bool:
        """Whether this request (``self.requests``) runs the graph the paired steps did not choose (under the lock)."""
        if pays != self.choice:  # a new or changed choice: watch it closely again
            self.choice, self.explore_every = pays, EXPLORE_EVERY
            self.next_explore = self.requests + EXPLORE_EVERY - 1
        if self.requests < self.next_explore:
            return False
        self.explore_every = min(2 * self.explore_every, MAX_EXPLORE_EVERY)
        self.next_explore = self.requests + self.explore_every
        return True

    def record_paired(self, medusa_tokens: float, medusa_s: float, vanilla_tokens: float, vanilla_s: float) -> None:
        """A greedy step on the Medusa graph, weighed both ways: its plan's expected tokens and seconds there, and
        those of the best plan without the heads on the vanilla graph (`decode.plan`)."""
        with self.lock:
            p = self.paired
            for k, value in enumerate((medusa_tokens, medusa_s, vanilla_tokens, vanilla_s)):
                p[k] = p[k] * PAIRED_DECAY + value
            p[4] += 1

    def alone_table(self, medusa: bool, upto: int) -> list[float]:
        """[upto + 1] estimated seconds of a one-sequence step by rows on the Medusa (or vanilla) graph. A graph not
        measured yet borrows the other's measurements rather than the 30 ms prior: on a machine where a step takes
        10 ms the prior would keep the heads untried until exploration measured them (the Medusa graph's step costs
        about a vanilla step plus the heads' millisecond)."""
        own, other = self.alone_cost[medusa], self.alone_cost[not medusa]
        return (own if own.measured or not other.measured else other).table(upto)

    def node_rates(self, tree) -> list[float]:
        """[N] how often each node of the heads' tree was accepted (root: 1). Lists, as `AcceptanceRates`'."""
        if self.node_hits is None or len(self.node_hits) != tree.num_nodes:
            self.node_hits = (PRIOR_HEADS_NODE ** tree.depth * PRIOR_WEIGHT).tolist()  # a prior of PRIOR_WEIGHT steps
            self.heads_steps = PRIOR_WEIGHT
        steps = self.heads_steps
        rates = [hits / steps for hits in self.node_hits]
        rates[0] = 1.0
        return rates

    def record_heads(self, accepted_nodes) -> None:
        """A step verified the heads' tree (its nodes keep their indices when drafts are merged in); ``accepted_nodes``:
        the accepted ones among them, distinct."""
        if self.node_hits is not None:
            with self.lock:
                hits = self.node_hits
                decay = 1.0 if self.heads_steps < 100 else 0.99  # follow what the heads do on recent text
                if decay != 1.0:
                    hits[:] = [h * decay for h in hits]
                self.heads_steps = self.heads_steps * decay + 1
                for i in (accepted_nodes.tolist() if isinstance(accepted_nodes, np.ndarray) else accepted_nodes):
                    if i < len(hits):
                        hits[i] += 1
