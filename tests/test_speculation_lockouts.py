"""Speculation's measurements never lock a choice out for good: a row count priced out by one slow step, the heads'
tree on a graph no request runs, a draft kind or depth left out of every step, a source that keeps losing the
choice, and rates that must follow text that changed (`runtime/speculation.py`, `decode.plan`)."""

from __future__ import annotations

import numpy as np
import pytest

from medusa_export.runtime.context_drafts import ContextIndex
from medusa_export.runtime.speculation import PLAIN_MIN, AcceptanceRates
from medusa_export.runtime.tree import Tree


def test_a_count_priced_out_by_one_slow_step_is_measured_again():
    """One slow step at the heads' tree's count (a cold cache, a busy neighbour) priced the tree out of every later
    plan, so it never ran to be measured again: CI saw a chain-1 tree verified once in a whole run. Once no step has
    run that count for STALE_AFTER steps it is priced from the fresh counts below (never above its own mean), runs,
    and its mean starts again from at most that price, in case the step that came back was a cold one too; a count
    dear in truth is measured dear twice more and left alone for another STALE_AFTER steps."""
    from medusa_export.runtime.decode import Cursor, plan
    from medusa_export.runtime.speculation import STALE_AFTER, Speculation

    tree = Tree.from_choices([[0]], topk=4)  # the root and one head's guess: 2 rows
    heads = np.arange(40, dtype=np.int64).reshape(4, 10)
    spec = Speculation()
    cost = spec.alone_cost[True]
    step = lambda: plan(Cursor(3, heads, np.random.default_rng(0)), tree, spec, room=100, max_paths=None).num_nodes
    for _ in range(PLAIN_MIN):
        cost.record(1, 0.003)
    cost.record(2, 0.045)  # the slow one
    for i in range(STALE_AFTER):
        assert step() == 1, i  # 1.3 expected tokens in 45 ms lose to 1 in 3 ms
        cost.record(1, 0.003)
    assert cost.stale(2) and cost.table(2)[2] == pytest.approx(0.003 * 1.06) and step() == 2  # the tree pays
    cost.record(2, 0.045)  # cold again: the mean starts from the price, not from this step
    assert cost.table(2)[2] == pytest.approx(0.003 * 1.06) and step() == 2
    cost.record(2, 0.0032)
    assert cost.table(2)[2] == pytest.approx((0.00318 + 0.0032) / 2) and step() == 2  # the 45 ms are forgotten
    for _ in range(STALE_AFTER):
        cost.record(1, 0.003)
    for _ in range(3):  # stale again, and dear in truth this time: after a second dear step it is priced out again
        cost.record(2, 0.045)
    assert cost.table(2)[2] > 0.02 and step() == 1


def test_steps_on_the_vanilla_graph_age_the_medusa_graphs_counts():
    """A request without drafts takes the heads only where their tree beats a plain step; once one slow tree step
    priced it out, every such request ran on the vanilla graph and the Medusa graph's table, unchanged, kept it out
    for good. The two graphs' tables share one clock: after STALE_AFTER vanilla steps the tree is tried again."""
    from medusa_export.runtime.speculation import STALE_AFTER, Speculation

    tree = Tree.from_choices([[0]], topk=4)
    spec = Speculation()
    for medusa in (True, False):
        for _ in range(PLAIN_MIN):
            spec.alone_cost[medusa].record(1, 0.003)
    spec.alone_cost[True].record(2, 0.045)
    for _ in range(STALE_AFTER):
        assert spec.heads_without_drafts(tree) is None
        spec.alone_cost[False].record(1, 0.003)  # the request's steps, on the vanilla graph
    assert spec.heads_without_drafts(tree) is tree
    # A whole-tree backend's Medusa graph measures its tree's count alone: gone stale with nothing fresher to price
    # it from, it keeps what was measured, not the 30 ms prior that would keep the heads out for good.
    whole = Speculation()
    for _ in range(PLAIN_MIN):
        whole.alone_cost[True].record(2, 0.0045)
        whole.alone_cost[False].record(1, 0.004)
    for _ in range(STALE_AFTER):
        whole.alone_cost[False].record(1, 0.004)
    assert whole.alone_cost[True].stale(2) and whole.alone_table(True, 2)[2] == pytest.approx(0.0045)
    assert whole.heads_without_drafts(tree) is tree


def _rows_on_repetitive_text(spec, steps: int) -> list[int]:
    """Rows of each of ``steps`` planned steps on the vanilla graph over text that repeats every 8 tokens (so every
    context draft is right), a row costing 40 % of a step (only likely drafts pay); verification simulated."""
    from medusa_export.runtime.decode import Cursor, plan

    text, cost = [1, 2, 3, 4, 5, 6, 7, 8] * 80, spec.alone_cost[False]
    for rows in range(1, 10):
        for _ in range(PLAIN_MIN):
            cost.record(rows, 0.010 * (1 + 0.4 * (rows - 1)))
    cursor, k, out = Cursor(text[8], None, np.random.default_rng(0), ContextIndex(text[:9])), 9, []
    for _ in range(steps):
        p = plan(cursor, None, spec, room=100, max_paths=None)
        new = text[k:k + p.num_nodes]  # every draft right: the drafts, then the bonus token
        if p.draft:
            spec.rates.record(p.kind, p.drafted, p.drafted)
        cost.record(p.num_nodes, 0.010 * (1 + 0.4 * (p.num_nodes - 1)))
        cursor.advance(new, spec)
        cursor.root, k = new[-1], k + len(new)
        out.append(p.num_nodes)
    return out


def test_a_draft_left_out_is_scored_against_what_follows_so_its_kind_can_come_back():
    """Drafts of a kind measured as seldom right are left out of every step where a row costs much; unverified,
    their rate would never move again, though the text turned repetitive. Left-out drafts are scored against the
    tokens that follow, as the heads' unverified guesses are: the rate climbs and the drafts are verified again."""
    from medusa_export.runtime.speculation import Speculation

    spec = Speculation()
    for kind in range(len(spec.rates.conditional)):
        for _ in range(20):
            spec.rates.record(kind, 1, 0)  # earlier text: every first draft wrong
    rows = _rows_on_repetitive_text(spec, 40)
    assert rows[0] == 1 and max(rows) > 1, rows  # left out at first, verified again once scored right


def test_a_drafts_tail_left_out_is_scored_so_its_depth_can_come_back():
    """The same for a depth: with second drafts measured as seldom right, steps verify one draft each; the tokens
    after it are scored against the bonus tokens, and deeper drafts are verified again."""
    from medusa_export.runtime.speculation import Speculation

    spec = Speculation()
    for kind in range(len(spec.rates.conditional)):
        for _ in range(15):
            spec.rates.record(kind, 2, 1)  # earlier text: first drafts right, second ones wrong
    rows = _rows_on_repetitive_text(spec, 60)
    assert rows[0] == 2 and max(rows) > 2, rows


def test_the_other_sources_draft_is_scored_without_being_verified():
    """Of a context draft and a corpus draft only the likelier is weighed; the other is scored against the tokens
    that follow, so a source that keeps losing the choice stays measured."""
    from medusa_export.runtime.context_drafts import Draft
    from medusa_export.runtime.decode import Cursor
    from medusa_export.runtime.speculation import Speculation

    class Corpus:  # always proposes 8 then 9, as a corpus-draft kind of its own
        def propose(self, tokens, max_tokens):
            return Draft([8, 9], 1, kind=len(spec.rates.conditional) - 1)

    spec = Speculation()
    spec.corpus = Corpus()
    cursor = Cursor(3, None, np.random.default_rng(0), ContextIndex([1, 2, 3, 4, 5, 1, 2, 3]))
    loser = Corpus().propose([], 2).rate_kind
    for _ in range(30):
        spec.rates.record(loser, 1, 0)  # the corpus's kind measured as seldom right: the context's draft wins
    before = spec.rates.proposed[loser][:2].copy(), spec.rates.conditional[loser][0]
    assert cursor.propose(spec, 4).tokens[:2] == [4, 5]
    cursor.advance([8], spec)
    cursor.advance([9], spec)
    assert np.array_equal(spec.rates.proposed[loser][:2], before[0] + 1)  # both its tokens scored, both right
    assert spec.rates.conditional[loser][0] > before[1] and not cursor.draft_shadows


def test_a_rate_follows_its_kinds_recent_drafts():
    """A long-running process: a kind wrong 2,000 times, then right 400 times, is measured as mostly right (its
    counts weigh about its last RATE_WINDOW drafts); without the window it would read 0.17."""
    from medusa_export.runtime.speculation import RATE_WINDOW

    rates = AcceptanceRates(max_draft=2)
    for right in [0] * 2000 + [1] * 400:
        rates.record(1, 1, right)
    assert rates.proposed[1][0] == pytest.approx(RATE_WINDOW) and rates.conditional[1][0] > 0.6
