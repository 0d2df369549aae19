"""Context drafts (prompt lookup): the index proposes what followed the longest earlier match of the sequence's
suffix; a draft merges into the heads' tree without repeating a node; and greedy decoding with drafts gives exactly
the tokens of plain greedy decoding (the step cost model that decides how many drafts a step verifies:
test_step_costs.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TINY_PROMPTS, run_decode

from medusa_export.runtime.context_drafts import ContextIndex
from medusa_export.runtime.step_tree import CONTEXT, HEADS, ROOT, StepTree
from medusa_export.runtime.tree import Tree, load_choices


# ------------------------------------------------------------------------------------------------ the index


def _brute_force(seq: list[int], max_ngram: int, min_ngram: int, k: int):
    """The longest suffix (max..min tokens) with an earlier occurrence; what followed its latest one."""
    for n in range(min(max_ngram, len(seq)), min_ngram - 1, -1):
        suffix = seq[len(seq) - n:]
        starts = [i for i in range(len(seq) - n) if seq[i:i + n] == suffix]
        if starts:
            return seq[starts[-1] + n:starts[-1] + n + k], n
    return None


@settings(max_examples=200, deadline=None)
@given(seq=st.lists(st.integers(0, 4), min_size=1, max_size=40), max_ngram=st.integers(1, 4),
       min_ngram=st.integers(1, 4), k=st.integers(1, 6), split=st.integers(0, 40))
def test_index_finds_the_latest_earlier_occurrence_of_the_longest_suffix(seq, max_ngram, min_ngram, k, split):
    min_ngram = min(min_ngram, max_ngram)
    index = ContextIndex(seq[:split], max_ngram, min_ngram)
    index.extend(seq[split:])  # built in two parts: the same as in one
    draft = index.propose(k)
    expected = _brute_force(seq, max_ngram, min_ngram, k)
    assert (draft.tokens, draft.ngram) == expected if expected else draft is None


def test_index_examples():
    index = ContextIndex([7, 1, 2, 3, 9, 1, 2])
    draft = index.propose(3)
    assert draft.tokens == [3, 9, 1] and draft.ngram == 2  # "1 2" was followed by "3 9 1"
    index.extend([5])
    assert index.propose(3) is None  # 5 never occurred before
    assert ContextIndex([4]).propose(2) is None and ContextIndex([4, 4]).propose(2).tokens == [4]
    with pytest.raises(ValueError):
        ContextIndex([], max_ngram=1, min_ngram=2)


# ------------------------------------------------------------------------------------------ the step's tree


def _check_tree(p: StepTree) -> None:
    """Parents first, masks = ancestors-or-self, each path root-to-leaf, every node on a path."""
    n = p.num_nodes
    assert p.parent[0] == -1 and all(p.parent[i] < i for i in range(1, n))
    for i in range(n):
        ancestors, node = {i}, i
        while p.parent[node] >= 0:
            node = p.parent[node]
            ancestors.add(node)
        assert set(np.flatnonzero(p.mask[i])) == ancestors
        assert p.depth[i] == len(ancestors) - 1
    leaves = {i for i in range(n) if not (p.parent == i).any()}
    assert {int(row[row >= 0][-1]) for row in p.paths_nodes} == leaves and len(p.paths_nodes) == len(leaves)
    for row in p.paths_nodes:
        nodes = row[row >= 0]
        assert nodes[0] == 0 and all(p.parent[b] == a for a, b in zip(nodes, nodes[1:]))


def _heads_plan():
    tree = Tree.from_choices([(0,), (1,), (0, 0), (0, 1), (0, 0, 0)], topk=2, num_heads=3)
    heads = np.array([[10, 11], [20, 21], [30, 31]])  # [K, topk] the heads' top-2 ids
    from medusa_export.runtime.decode import candidates

    return StepTree.heads(tree, candidates(tree, 5, heads))  # tokens: 5 | 10 11 | 20 21 | 30


def test_a_draft_shares_the_nodes_it_agrees_with_and_branches_where_it_leaves():
    plan = _heads_plan()
    assert plan.tokens.tolist() == [5, 10, 11, 20, 21, 30]
    same = plan.with_draft([10, 20, 30], kind=2)  # exactly the main chain: nothing new
    assert same.num_nodes == plan.num_nodes and same.drafted == 3 and same.kind == 2
    extended = plan.with_draft([10, 20, 30, 40])  # one past the leaf: the leaf's path grows, no new path
    assert extended.num_nodes == 7 and extended.num_paths == plan.num_paths
    assert extended.parent[6] == 5 and extended.source[6] == CONTEXT and extended.depth[6] == 4
    branched = plan.with_draft([10, 99, 98])  # leaves the tree under a node with children: a new path
    assert branched.num_nodes == 8 and branched.num_paths == plan.num_paths + 1
    assert branched.tokens[6:].tolist() == [99, 98] and branched.parent[6:].tolist() == [1, 6]  # below "10"
    leaf = plan.with_draft([10, 21, 99])  # "10 21" is a leaf: its path grows
    assert leaf.num_paths == plan.num_paths and leaf.parent[6] == 4
    fresh = plan.with_draft([12, 13])
    assert fresh.parent[6:].tolist() == [0, 6] and fresh.source[6:].tolist() == [CONTEXT, CONTEXT]
    for p in (plan, same, extended, branched, leaf, fresh, StepTree.chain(5, [1, 2, 3]), StepTree.chain(5, [])):
        _check_tree(p)
    assert plan.source.tolist() == [ROOT] + [HEADS] * 5


@settings(max_examples=60, deadline=None)
@given(draft=st.lists(st.sampled_from([10, 11, 20, 21, 30, 31, 99]), min_size=1, max_size=5))
def test_any_draft_gives_a_valid_tree_holding_each_candidate_once(draft):
    plan = _heads_plan()
    merged = plan.with_draft(draft)
    _check_tree(merged)
    # The draft is one root-to-node chain of the merged tree, and no two siblings hold the same token.
    node = 0
    for token in draft:
        children = np.flatnonzero(merged.parent == node)
        assert len(set(merged.tokens[children].tolist())) == len(children)
        node = int(children[merged.tokens[children] == token][0])


# ------------------------------------------------------------------------------------------- lossless decoding


REPEATING = [(7, 8, 9, 10, 7, 8, 9, 10, 7, 8), (3, 4, 3, 4, 3, 4, 3), tuple(TINY_PROMPTS[0]) * 2]


@pytest.mark.parametrize("spec", [None, "chain-2", "cpu_small_10", "mc_sim_7b_63"])
@pytest.mark.parametrize("layout", ["shared", "own"])
def test_greedy_with_context_drafts_equals_plain_greedy(tiny, spec, layout, clock_free_steps):
    """With and without heads, on trees of one path or many: the same tokens as plain greedy decoding, while
    context drafts are accepted (the prompts repeat, and so does the tiny model)."""
    backend = tiny.backend(4, layout)
    tree = Tree.from_choices(load_choices(spec), topk=10, num_heads=4) if spec else None
    accepted = 0
    for prompt in [*TINY_PROMPTS, *REPEATING]:
        tokens, stats, _ = run_decode(backend, prompt, tree, 40, medusa=True)
        assert tokens == tiny.reference(prompt, 40), prompt
        assert stats.accepted_context <= stats.context_rows
        accepted += stats.accepted_context
    assert accepted > 0


def test_context_drafts_are_off_for_sampling_and_when_asked(tiny):
    backend = tiny.backend(2, "shared")
    tree = Tree.from_choices(load_choices("chain-2"), topk=10, num_heads=2)
    prompt = REPEATING[0]
    _, stats, _ = run_decode(backend, prompt, tree, 20, medusa=True, context_drafts=False)
    assert stats.context_rows == 0
    _, stats, _ = run_decode(backend, prompt, tree, 20, medusa=True, temperature=0.7, seed=1)
    assert stats.context_rows == 0
    _, stats, _ = run_decode(backend, prompt, tree, 20, medusa=True)
    assert stats.context_rows > 0


@pytest.mark.parametrize("heads, server_drafts, temperature, medusa, speculates", [
    (True, True, 0, True, True), (False, True, 0, True, True),  # no heads: greedy requests use context drafts
    (False, True, 0.7, True, False), (False, False, 0, True, False),  # ... not when sampling or switched off
    (True, False, 0, True, True), (True, True, 0, False, False),  # the request's "medusa": false is plain decoding
])
def test_server_requests_speculate_from_the_context_without_heads(heads, server_drafts, temperature, medusa, speculates):
    from conftest import make_chat_tokenizer

    from medusa_export.runtime.decode import uses_context
    from medusa_export.runtime.serve.requests import ServedModel, parse_completion

    model = ServedModel("m", make_chat_tokenizer(), 64, heads, server_drafts)
    cfg = parse_completion({"prompt": [1, 2, 3], "temperature": temperature, "medusa": medusa}, model).config
    assert cfg.medusa == speculates and cfg.context_drafts == server_drafts
    assert uses_context(cfg) == (speculates and server_drafts and temperature == 0)
