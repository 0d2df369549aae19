"""How much each step verifies: the step cost model takes drafts only while they pay, measures the steps without
drafts that it would otherwise never run, learns acceptance by depth, and decides which graph runs a request and
which plan a step verifies (`runtime/speculation.py`, `decode.plan`, the batched engine's drafts)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medusa_export.runtime.context_drafts import ContextIndex
from medusa_export.runtime.speculation import PLAIN_EVERY, PLAIN_MIN, AcceptanceRates, StepCost
from medusa_export.runtime.tree import Tree


# ---------------------------------------------------------------------------------------------- the cost model


def test_drafts_are_taken_while_they_pay():
    cost = StepCost()
    for rows, ms in [(1, 30), (2, 32), (3, 34), (4, 36), (8, 60)]:
        cost.record(rows, ms / 1e3)
    likely = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.1])
    assert cost.worth([likely], expected=1.0, rows=1, limit=8) == [4]  # 4 rows: 4.0 tokens in 36 ms; the fifth won't pay
    assert cost.worth([likely], expected=1.0, rows=1, limit=2) == [2]  # the budget
    assert cost.worth([np.array([0.03])], expected=1.0, rows=1, limit=8) == [0]  # 3 % for 7 % more time
    # Three sequences, three tokens a step already: 7 rows (5.55 tokens in ~42 ms) beat 8 (5.65 in 60 ms).
    full = cost.worth([np.array([0.9, 0.85]), np.array([0.1]), np.array([0.5, 0.3])], expected=3.0, rows=3, limit=8)
    assert full == [2, 0, 2]


def test_unmeasured_row_counts_are_estimated_from_the_nearest_measured_ones():
    cost = StepCost()
    assert np.all(np.diff(cost.table(10)[1:]) > 0)  # nothing measured: a prior that grows with rows
    cost.record(4, 0.040)
    cost.record(2, 0.050)  # noise: two rows measured slower than four
    t = cost.table(6)
    assert t[2] == pytest.approx(0.050) and t[4] >= t[3] >= t[2]  # never cheaper with more rows
    assert t[1] == pytest.approx(0.050 / 1.06) and t[6] >= t[5] >= t[4]


def test_a_one_row_step_runs_until_measured_and_again_now_and_then():
    """Measuring larger steps never reaches the one-row step (estimated from the smallest measured count, which can
    be far dearer): it runs while measured fewer than PLAIN_MIN times, and again after PLAIN_EVERY steps without
    one; then the measured costs decide. A backend that takes only the whole tree keeps it on the Medusa graph."""
    from medusa_export.runtime.decode import Cursor, plan
    from medusa_export.runtime.speculation import Speculation

    context = ContextIndex([1, 2, 3, 9, 1, 2, 3])  # "1 2 3" seen before: the draft [9, 1, 2, 3] is proposed
    spec = Speculation()
    spec.rates = AcceptanceRates()
    for rows in range(2, 6):
        spec.alone_cost[False].record(rows, 0.010 * (1 + 0.01 * rows))  # drafts look nearly free
    step = lambda: plan(Cursor(3, None, np.random.default_rng(0), context), None, spec, room=100, max_paths=None)
    runs = []
    for _ in range(PLAIN_MIN + 1):
        p = step()
        runs.append(p.num_nodes)
        spec.alone_cost[False].record(p.num_nodes, 0.010 if p.num_nodes == 1 else 0.0101)
    assert runs[:PLAIN_MIN] == [1] * PLAIN_MIN and runs[-1] > 1  # measured as dear as the drafts: they pay
    since = 1  # steps since the last one-row step: the drafted one above
    while not spec.alone_cost[False].plain_due():
        assert step().num_nodes > 1
        spec.alone_cost[False].record(3, 0.0101)
        since += 1
    assert since == PLAIN_EVERY and step().num_nodes == 1  # measured again, then drafts again
    spec.alone_cost[False].record(1, 0.010)
    assert step().num_nodes > 1
    for _ in range(10):
        spec.alone_cost[False].record(1, 0.001)  # one-row steps measured far cheaper: the root alone pays
    assert step().num_nodes == 1 and not spec.alone_cost[False].plain_due()
    tree = Tree.from_choices([[0], [0, 0]], topk=4)
    fresh = Speculation()  # nothing measured: a one-row step is due on either graph...
    whole = plan(Cursor(3, np.arange(40, dtype=np.int64).reshape(4, 10), np.random.default_rng(0), context), tree, fresh,
                 room=100, max_paths=None, whole_tree=True)
    assert fresh.alone_cost[True].plain_due() and whole.num_nodes == tree.num_nodes  # ...but the whole tree is kept
    on_vanilla = plan(Cursor(3, None, np.random.default_rng(0), context), None, fresh, room=100, max_paths=None,
                      whole_tree=True)
    assert on_vanilla.num_nodes == 1  # a whole-tree backend's vanilla graph measures its one-row step like any


def test_plain_due_counts_steps_of_any_size():
    cost = StepCost()
    assert cost.plain_due()
    for _ in range(PLAIN_MIN):
        cost.record(1, 0.01)
    assert not cost.plain_due()
    for i in range(PLAIN_EVERY):
        assert not cost.plain_due(), i
        cost.record(2 + i % 3, 0.012)
    assert cost.plain_due()
    cost.record(1, 0.01)
    assert not cost.plain_due()


def test_a_step_beyond_the_cost_table_takes_no_drafts():
    """A lanes step of more rows than the table holds (a large --max-num-batched-tokens) verifies no drafts, and one
    just below it at most what fits."""
    cost = StepCost(max_rows=16)
    likely = [np.array([0.9, 0.9, 0.9])]
    assert cost.worth(likely, expected=1.0, rows=20, limit=8) == [0]
    assert cost.worth(likely, expected=1.0, rows=16, limit=8) == [0]
    assert cost.worth(likely, expected=1.0, rows=14, limit=8) == [2]


def test_a_lanes_step_verifies_no_drafts_while_its_count_without_them_is_unmeasured():
    """As a one-sequence step measures the root alone, a lanes step runs without drafts while its row count without
    them (its sequences' roots and prompt chunks) has fewer than PLAIN_MIN measurements, or has gone PLAIN_EVERY
    steps without one (its drafts are then only scored against what follows); otherwise the measured costs decide."""
    from types import SimpleNamespace

    from medusa_export.runtime.decode import Cursor
    from medusa_export.runtime.engine import Engine
    from medusa_export.runtime.speculation import PLAIN_EVERY, PLAIN_MIN, Speculation

    class Decoding:  # what `_drafts` reads of a sequence (hashable, as sequences are)
        def __init__(self) -> None:  # "1 2 3" seen: a draft is proposed
            self.cursor = Cursor(3, None, np.random.default_rng(0), ContextIndex([1, 2, 3, 9, 1, 2, 3]))
            self.session = SimpleNamespace(capacity=100, length=10)

    spec = Speculation()
    engine = SimpleNamespace(gen=SimpleNamespace(spec=spec))
    decoding = [Decoding(), Decoding()]
    for rows in range(3, 12):
        spec.batched_cost.record(rows, 0.010 * (1 + 0.001 * rows))  # further rows nearly free: drafts pay
    assert Engine._drafts(engine, decoding, 2, budget=8) == {}  # two rows without drafts: never measured
    assert all(seq.cursor.draft_shadows for seq in decoding)  # the drafts left out are watched, not dropped
    for seq in decoding:
        seq.cursor.draft_shadows.clear()
    for _ in range(PLAIN_MIN):
        spec.batched_cost.record(2, 0.010)
    drafts = Engine._drafts(engine, decoding, 2, budget=8)
    assert len(drafts) == 2 and all(len(d.tokens) > 0 for d in drafts.values())
    for _ in range(PLAIN_EVERY):
        spec.batched_cost.record(5, 0.0101)
    assert Engine._drafts(engine, decoding, 2, budget=8) == {}  # stale: measured again


def test_acceptance_rates_learn_by_depth():
    rates = AcceptanceRates(max_draft=4)
    before = np.array(rates.cumulative(3, 4))
    assert len(before) == 4 and np.all(np.diff(before) < 0)
    assert np.allclose(before, np.cumprod(rates.accepted[3] / rates.proposed[3]))
    for _ in range(50):
        rates.record(3, proposed=4, accepted=4)
    assert np.all(np.array(rates.cumulative(3, 4)) > before) and rates.cumulative(1, 2)[0] < before[0]
    for _ in range(200):
        rates.record(3, proposed=4, accepted=0)  # the first is always wrong: the deeper ones are never tried
    assert rates.cumulative(3, 1)[0] < 0.3


# ------------------------------------------------------------------------------------ plans and graphs


def test_an_unmeasured_graph_borrows_the_other_graphs_step_cost():
    from medusa_export.runtime.speculation import EXPLORE_EVERY, Speculation

    tree = Tree.from_choices([[0], [0, 0]], topk=4)  # prior: 1 + 0.3 + 0.09 tokens per step
    spec = Speculation()
    for _ in range(5):
        spec.alone_cost[False].record(1, 0.010)  # a fast machine: 10 ms vanilla steps, the heads never measured
    assert np.allclose(spec.alone_table(True, 3), spec.alone_table(False, 3))
    assert spec.heads_for(tree) is tree  # tried at once, not after EXPLORE_EVERY requests
    for _ in range(5):
        spec.alone_cost[True].record(3, 0.030)  # measured: the heads' steps cost 3x a plain one here
    assert spec.alone_table(True, 3)[3] == pytest.approx(0.030)
    # Not worth it by the measured costs, but until steps were weighed on both graphs every other request tries them
    assert [spec.heads_for(tree) is tree for _ in range(4)] == [True, False, True, False]


def test_a_backend_that_takes_only_the_whole_tree_gets_exactly_the_heads_tree():
    from medusa_export.runtime.decode import Cursor, plan
    from medusa_export.runtime.speculation import Speculation

    tree = Tree.from_choices([[0], [0, 0]], topk=4)
    heads = np.arange(40, dtype=np.int64).reshape(4, 10)  # [K, R] the heads' top-R guesses
    context = ContextIndex([1, 2, 3, 9, 1, 2, 3])  # "1 2 3" seen before: a draft [9, 1, 2, 3] is proposed
    spec = Speculation()
    for _ in range(PLAIN_MIN):
        spec.alone_cost[True].record(1, 0.010)  # root-only steps look far cheaper than the tree...
        spec.alone_cost[True].record(3, 0.050)
    free = plan(Cursor(3, heads, np.random.default_rng(0), context), tree, spec, room=100, max_paths=None)
    assert free.num_nodes != tree.num_nodes  # ...so a backend taking any shape gets another plan
    whole = plan(Cursor(3, heads, np.random.default_rng(0), context), tree, spec, room=100, max_paths=None,
                 whole_tree=True)
    assert whole.num_nodes == tree.num_nodes and whole.tokens.tolist() == [3, 0, 10] and not whole.draft


@settings(max_examples=40, deadline=None)
@given(draft=st.lists(st.integers(0, 12), min_size=1, max_size=8), cheap=st.booleans())
def test_a_plan_holds_no_more_paths_than_the_graph_verifies_exactly(draft, cheap):
    """A fused graph verifies a fixed number of paths exactly (one attention group each): with one, a draft that
    would branch off the heads' chain is not merged into their tree."""
    from medusa_export.runtime.decode import Cursor, plan
    from medusa_export.runtime.speculation import Speculation

    tree = Tree.from_choices([[0], [0, 0]], topk=4)
    heads = np.arange(40, dtype=np.int64).reshape(4, 10)  # the heads' chain is 3 -> 0 -> 10
    context = ContextIndex([3, *draft, 3])  # "3" seen before: the draft that followed it is proposed
    spec = Speculation()
    for _ in range(PLAIN_MIN):
        for rows in range(1, 12):  # rows nearly free: every draft token pays
            spec.alone_cost[True].record(rows, 0.010 * (1 + (0.001 if cheap else 0.05) * rows))
    p = plan(Cursor(3, heads, np.random.default_rng(0), context), tree, spec, room=100, max_paths=1)
    assert p.num_paths == 1


def test_once_the_same_steps_were_weighed_on_both_graphs_the_faster_one_runs_the_requests():
    """With drafts riding on both graphs, the heads' tree alone says little: the expected tokens per second of the
    same steps on each graph decide, and the other graph still runs every EXPLORE_EVERY-th request, whichever won."""
    from medusa_export.runtime.speculation import EXPLORE_EVERY, MIN_PAIRED_STEPS, Speculation

    tree = Tree.from_choices([[0], [0, 0]], topk=4)
    spec = Speculation()
    for _ in range(5):
        spec.alone_cost[True].record(3, 0.0044)  # by the prior rule the heads pay
    for _ in range(MIN_PAIRED_STEPS - 1):  # the heads add nothing the drafts do not, and their graph is slower
        spec.record_paired(1.2, 0.0044, 1.2, 0.0040)
    for _ in range(5):
        spec.alone_cost[False].record(1, 0.004)
    spec.requests = 2  # not an exploring request next
    assert spec.heads_for(tree) is tree  # one step short of MIN_PAIRED_STEPS: the prior rule decides
    spec.record_paired(1.2, 0.0044, 1.2, 0.0040)
    spec.alone_cost[False] = StepCost()  # as if the vanilla graph had never run
    spec.requests = 2
    assert spec.heads_for(tree) is tree  # its cost not measured: the prior rule decides

    def decisions() -> tuple[int, int]:
        made = [spec.heads_for(tree) for _ in range(EXPLORE_EVERY)]
        return sum(d is tree for d in made), sum(d is None for d in made)

    spec.alone_cost[False].record(1, 0.004)
    assert decisions() == (1, EXPLORE_EVERY - 1)
    for _ in range(8 * MIN_PAIRED_STEPS):
        spec.record_paired(2.0, 0.0044, 1.2, 0.0040)  # the heads now add 0.8 tokens a step: vanilla still tried
    assert decisions() == (EXPLORE_EVERY - 1, 1)


def test_explorations_of_the_losing_graph_thin_out_while_the_choice_holds_and_resume_when_it_changes():
    """Each exploration that leaves the choice as it was doubles the interval to the next (8, 16, 32, 64, then every
    64th request); a changed choice explores again after EXPLORE_EVERY requests."""
    from medusa_export.runtime.speculation import EXPLORE_EVERY, MAX_EXPLORE_EVERY, MIN_PAIRED_STEPS, Speculation

    tree = Tree.from_choices([[0], [0, 0]], topk=4)
    spec = Speculation()
    spec.alone_cost[True].record(3, 0.0044)
    spec.alone_cost[False].record(1, 0.004)
    for _ in range(MIN_PAIRED_STEPS):
        spec.record_paired(1.2, 0.0044, 1.2, 0.0040)  # the vanilla graph wins the same steps

    def explorations(requests: int, winner) -> list[int]:
        """The requests (1-based) among the next ``requests`` that did not get ``winner``."""
        return [i for i in range(1, requests + 1) if spec.heads_for(tree) is not winner]

    gaps = [EXPLORE_EVERY, 2 * EXPLORE_EVERY, 4 * EXPLORE_EVERY, MAX_EXPLORE_EVERY, MAX_EXPLORE_EVERY]
    assert explorations(sum(gaps), None) == np.cumsum(gaps).tolist()
    for _ in range(8 * MIN_PAIRED_STEPS):
        spec.record_paired(2.0, 0.0044, 1.2, 0.0040)  # the heads now pay: the Medusa graph wins
    assert explorations(3 * EXPLORE_EVERY, tree) == [EXPLORE_EVERY, 3 * EXPLORE_EVERY]


def test_a_step_on_the_medusa_graph_is_weighed_on_both_graphs():
    """`plan` on the Medusa graph records its own plan by that graph's step costs and the best plan without the
    heads by the vanilla graph's, whole-tree backends included; nothing while the vanilla graph's cost is only
    borrowed, for a request without drafts, or for a step on the vanilla graph."""
    from medusa_export.runtime.decode import Cursor, plan
    from medusa_export.runtime.speculation import Speculation

    tree = Tree.from_choices([[0], [0, 0]], topk=4)
    heads = np.arange(40, dtype=np.int64).reshape(4, 10)
    seen = [1, 2, 3, 9, 1, 2, 3]  # "1 2 3" seen before: a draft [9, 1, 2, 3]
    spec = Speculation()
    for _ in range(PLAIN_MIN):  # the one-row step measured: no step runs alone to measure it
        for rows, seconds in ((1, 0.012), (3, 0.013), (5, 0.014)):
            spec.alone_cost[True].record(rows, seconds)

    def cursor(context=True, with_heads=True):
        return Cursor(3, heads if with_heads else None, np.random.default_rng(0),
                      ContextIndex(seen) if context else None)

    plan(cursor(), tree, spec, room=100, max_paths=None)
    assert spec.paired[4] == 0  # the vanilla graph's cost is not measured yet
    spec.alone_cost[False].record(1, 0.010)
    chosen = plan(cursor(), tree, spec, room=100, max_paths=None)
    medusa_tokens, medusa_s, vanilla_tokens, vanilla_s, steps = spec.paired
    assert steps == 1 and medusa_tokens >= 1
    assert medusa_s == pytest.approx(spec.alone_table(True, chosen.num_nodes)[chosen.num_nodes])
    draft = spec.propose(ContextIndex(seen), 8)
    q = spec.rates.cumulative(draft.rate_kind, len(draft.tokens))
    vanilla = spec.alone_table(False, 8)
    best = max(((1 + sum(q[:n]), vanilla[n + 1]) for n in range(len(q) + 1)), key=lambda o: o[0] / o[1])
    assert (vanilla_tokens, vanilla_s) == pytest.approx(best)  # the best chain of the drafts, by the vanilla graph's
    whole = plan(cursor(), tree, spec, room=100, max_paths=None, whole_tree=True)
    assert whole.num_nodes == tree.num_nodes and spec.paired[4] == 2  # weighed as the whole tree it verifies
    assert spec.paired[1] - medusa_s * 0.995 == pytest.approx(spec.alone_table(True, 3)[3])
    plan(cursor(context=False), tree, spec, room=100, max_paths=None)  # no drafts: nothing to weigh against
    plan(cursor(with_heads=False), tree, spec, room=100, max_paths=None)  # no heads' guesses this step
    plan(cursor(), None, spec, room=100, max_paths=None)  # the vanilla graph
    assert spec.paired[4] == 2


def test_a_request_without_drafts_is_not_a_request_of_the_graph_choice():
    """A request with context drafts off asks whether the heads beat plain steps; it is not counted among the
    requests that learn and explore the choice of the heads next to drafts (bench's heads-alone rows took every
    third place there)."""
    from medusa_export.runtime.speculation import Speculation

    tree = Tree.from_choices([[0], [0, 0]], topk=4)
    spec = Speculation()
    assert spec.heads_without_drafts(tree) is tree  # the prior: the heads pay
    assert spec.requests == 0
    for _ in range(PLAIN_MIN):
        spec.alone_cost[False].record(1, 0.010)
        spec.alone_cost[True].record(3, 0.030)  # a tree step three times dearer than a plain one
    assert spec.heads_without_drafts(tree) is None and spec.requests == 0
