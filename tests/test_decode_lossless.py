"""Greedy Medusa == greedy vanilla, token for token, over many random trees, head counts and layouts;
acceptance rules on hand-made outputs; an oracle that proves long acceptances; typical acceptance;
stopping (EOS, length, stop strings, full KV buffer) and input errors through the `Generator`."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from medusa_export.runtime.acceptance import accept_greedy, accept_typical, next_token
from medusa_export.runtime.backends.base import StepOutput
from medusa_export.runtime.decode import GenerationConfig, candidates
from medusa_export.runtime.errors import InputError
from medusa_export.runtime.step_tree import StepTree
from medusa_export.runtime.generator import Generator
from medusa_export.runtime.tree import Tree, load_choices
from conftest import ClockFreeCost
from oracle import OracleSession

pytest.importorskip("torch")
pytest.importorskip("transformers")

# Token-id prompts for the tiny model (the `tiny.reference` helper checks their argmax margins).
TINY_PROMPTS = ([5, 6, 7, 8, 9], [1, 2, 3], [100, 200, 300, 17, 17, 17, 42], [250, 11, 250, 11, 250])

N_NEW = 24


@st.composite
def medusa_trees(draw, num_heads: int, max_topk: int = 10, max_paths: int = 14):
    """Valid prefix-closed trees: depth <= num_heads, ranks < topk (topk <= the backend's head top-k)."""
    topk = draw(st.integers(1, max_topk))
    raw = draw(st.lists(st.lists(st.integers(0, topk - 1), min_size=1, max_size=num_heads),
                        min_size=1, max_size=max_paths))
    closed = sorted({tuple(p[:d]) for p in raw for d in range(1, len(p) + 1)})
    return Tree.from_choices(draw(st.permutations(closed)), topk=topk, num_heads=num_heads)


@st.composite
def lossless_cases(draw):
    k = draw(st.integers(1, 4))
    layout = draw(st.sampled_from(["shared", "own"]))
    return k, layout, draw(medusa_trees(k)), draw(st.sampled_from(TINY_PROMPTS))


# ---------------------------------------------------------------------------------------------- lossless


def test_vanilla_decode_matches_plain_hf_greedy(tiny):
    """The reference itself: KV-cached vanilla decoding == argmax of full forwards."""
    plain = tiny.backend(None)
    with_heads = tiny.backend(2, "own")
    for prompt in TINY_PROMPTS:
        ref = tiny.reference(prompt, N_NEW)
        assert tiny.run(plain, prompt, None, N_NEW)[0] == ref
        assert tiny.run(with_heads, prompt, None, N_NEW)[0] == ref  # medusa=False on a Medusa backend


@given(case=lossless_cases())
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_greedy_medusa_is_lossless_random_trees(tiny, case):
    k, layout, tree, prompt = case
    tokens, stats, session = tiny.run(tiny.backend(k, layout), prompt, tree, N_NEW)
    assert tokens == tiny.reference(prompt, N_NEW)
    assert stats.steps >= 1 and stats.mean_accepted >= 1.0
    assert session.length <= len(prompt) + stats.step_tokens + 1


@pytest.mark.parametrize("layout", ["shared", "own"])
@pytest.mark.parametrize("spec, k", [("mc_sim_7b_63", 4), ("cpu_small_10", 4), ("chain-1", 1), ("chain-3", 3)])
def test_greedy_medusa_is_lossless_presets_via_generator(tiny, make_tokenizer, spec, k, layout):
    tree = Tree.from_choices(load_choices(spec), topk=10, num_heads=k)
    gen = Generator(tiny.backend(k, layout), make_tokenizer(), tree)
    # Every request and step runs the heads' tree: this test is about exact tree steps; whether they pay on the
    # machine is Speculation's decision (tests/test_step_costs.py), and random heads mostly do not.
    gen.spec.heads_for = lambda tree: tree
    gen.spec.alone_cost = {True: ClockFreeCost(row_share=0.0), False: ClockFreeCost(row_share=0.0)}
    accepted_more = False
    for prompt in TINY_PROMPTS[:3]:
        res = gen.generate(list(prompt), GenerationConfig(max_new_tokens=N_NEW))
        ref = tiny.reference(prompt, N_NEW)
        assert res.token_ids == ref and res.new_tokens == N_NEW
        assert res.finish_reason == "length" and res.medusa and res.backend == "torch"
        assert res.text == " ".join(f"t{t}" for t in ref)
        assert res.steps <= N_NEW and len(res.step_ms) == res.steps
        accepted_more |= res.mean_accepted > 1.0
    if spec != "chain-1" or layout == "shared":
        # Random heads are right sometimes (the tiny model's greedy output repeats itself).
        assert accepted_more


def test_some_steps_accept_several_tokens_with_random_heads(tiny):
    tree = Tree.from_choices(load_choices("cpu_small_10"), topk=10, num_heads=4)
    backend = tiny.backend(4, "shared")
    chunk_lengths = []
    for prompt in TINY_PROMPTS:
        from medusa_export.runtime.decode import DecodeStats, decode

        stats = DecodeStats()
        for i, chunk in enumerate(decode(backend.new_session(), list(prompt), tree, GenerationConfig(), stats)):
            chunk_lengths.append(len(chunk)) if i else None
            if i == 20:
                break
    assert max(chunk_lengths) >= 3 and min(chunk_lengths) == 1


# ---------------------------------------------------------------------------------------------- oracle


def oracle_run(tiny, k, layout, spec, prompt, rank=0, wrong=False, n=N_NEW):
    from medusa_export.runtime.decode import DecodeStats, decode
    tree = Tree.from_choices(load_choices(spec), topk=10, num_heads=k)
    full = list(prompt) + tiny.reference(prompt, n + k + 2)
    session = OracleSession(tiny.backend(k, layout).new_session(), full, rank, wrong)
    stats = DecodeStats()
    out = []
    # Heads only; the callers pin step costs (`clock_free_steps`): measured ones price a slow first tree step (a
    # busy machine, a cold cache) dear enough that every later step runs plain, and the heads are never verified.
    for chunk in decode(session, list(prompt), tree, GenerationConfig(context_drafts=False), stats):
        out += chunk
        if len(out) >= n:
            break
    return out[:n], stats, session


@pytest.mark.parametrize("layout", ["shared", "own"])
@pytest.mark.parametrize("k, spec, rank", [(4, "chain-4", 0), (4, "cpu_small_10", 0), (4, "mc_sim_7b_63", 3),
                                           (2, [(0,), (1,), (2,), (2, 0), (2, 1), (2, 2)], 2), (1, "chain-1", 0)])
def test_oracle_heads_accept_long_paths(tiny, layout, k, spec, rank, clock_free_steps):
    for prompt in TINY_PROMPTS[:2]:
        tokens, stats, session = oracle_run(tiny, k, layout, spec, prompt, rank)
        assert tokens == tiny.reference(prompt, N_NEW)
        assert stats.mean_accepted > 1.5
        if spec in ("chain-4", "cpu_small_10"):
            # Every path step is right: each step but possibly the last accepts k tokens plus the bonus.
            assert stats.mean_accepted >= k
        if rank > 0:
            # Accepted paths run through non-first children, so KV rows had to be moved.
            assert any(rows != list(range(len(rows))) for rows in session.accepted_rows[1:])


@pytest.mark.parametrize("spec, k", [("mc_sim_7b_63", 4), ("chain-2", 2)])
def test_always_wrong_heads_accept_nothing_and_stay_lossless(tiny, spec, k, clock_free_steps):
    for prompt in TINY_PROMPTS[:2]:
        tokens, stats, session = oracle_run(tiny, k, "shared", spec, prompt, wrong=True)
        assert tokens == tiny.reference(prompt, N_NEW)
        assert stats.mean_accepted == 1.0
        assert all(rows == [0] for rows in session.accepted_rows[1:])


# ---------------------------------------------------------------------------------------------- acceptance units


def fake_out(next_top1, input_probs=None, entropy=None, t=None):
    t = t or len(next_top1)
    ids = np.zeros((t, 2), np.int64)
    ids[:, 0] = next_top1
    return StepOutput(ids, np.full((t, 2), 0.5, np.float32),
                      np.zeros((t, t), np.float32) if input_probs is None else np.asarray(input_probs, np.float32),
                      np.zeros(t, np.float32) if entropy is None else np.asarray(entropy, np.float32), None)


def test_candidates_pick_from_the_pool():
    tree = Tree.from_choices([(0,), (1,), (0, 0), (0, 1), (0, 0, 2)], topk=3, num_heads=3)
    medusa = np.array([[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]])  # [K, R] with R > topk
    # nodes: root, (0,), (1,), (0,0), (0,1), (0,0,2)
    assert candidates(tree, 7, medusa).tolist() == [7, 10, 11, 20, 21, 32]


def test_accept_greedy_hand_made():
    tree = Tree.from_choices([(0,), (1,), (0, 0), (1, 0)], topk=2)  # nodes: root, (0,), (1,), (0,0), (1,0)
    tokens = np.array([7, 10, 11, 20, 20])
    # Base argmax at root is 11 -> node 2 matches; at node 2 argmax 20 -> node 4 matches.
    out = fake_out([11, 20, 20, 0, 5])
    acc = accept_greedy(tree, tokens, out)
    assert acc.nodes.tolist() == [0, 2, 4] and acc.accepted == 2
    assert next_token(out, int(acc.nodes[-1]), 0.0, np.random.default_rng(0)) == 5
    # A child matching while its parent did not never counts.
    out = fake_out([99, 20, 20, 0, 5])
    assert accept_greedy(tree, tokens, out).nodes.tolist() == [0]
    out = fake_out([10, 99, 20, 0, 5])
    assert accept_greedy(tree, tokens, out).nodes.tolist() == [0, 1]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_accept_greedy_is_the_longest_accepted_path(data):
    """On heads' trees with a draft merged in, and outputs drawn from a few tokens (so that many nodes match, and
    heads may repeat a token among siblings): the accepted nodes are the longest root-to-leaf prefix whose every
    node holds its parent's argmax."""
    choices = data.draw(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), max_size=5, unique=True))
    tree = Tree.from_choices(sorted({(a,) for a, _ in choices} | set(choices)) or [(0,)], topk=3, num_heads=2)
    heads = np.array(data.draw(st.lists(st.lists(st.integers(10, 13), min_size=3, max_size=3), min_size=2, max_size=2)))
    draft = data.draw(st.lists(st.integers(10, 13), max_size=5))
    plan = StepTree.heads(tree, candidates(tree, 9, heads)).with_draft(draft)
    nxt = data.draw(st.lists(st.integers(9, 13), min_size=plan.num_nodes, max_size=plan.num_nodes))
    got = accept_greedy(plan, plan.tokens, fake_out(nxt)).nodes.tolist()
    longest = 1
    for path in plan.paths_nodes.tolist():
        path = [n for n in path if n >= 0]
        k = 1
        while k < len(path) and plan.tokens[path[k]] == nxt[path[k - 1]]:
            k += 1
        longest = max(longest, k)
    assert len(got) == longest and got[0] == 0
    assert all(plan.parent[b] == a and plan.tokens[b] == nxt[a] for a, b in zip(got, got[1:]))


def test_accept_typical_threshold_and_tie_break():
    tree = Tree.from_choices([(0,), (1,), (0, 0)], topk=2)  # nodes: root, (0,), (1,), (0,0)
    # p_parent(child): root->1: 0.5, root->2: 0.3, node1->3: 0.05. Entropy 0 -> threshold min(0.09, 0.3).
    probs = np.zeros((4, 4))
    probs[0, 1], probs[0, 2], probs[1, 3] = 0.5, 0.3, 0.05
    out = fake_out([0, 0, 0, 0], probs)
    assert accept_typical(tree, np.arange(4), out, 0.09, 0.3).nodes.tolist() == [0, 1]
    probs[1, 3] = 0.2  # now node 3 passes: the longest path wins
    assert accept_typical(tree, np.arange(4), fake_out([0] * 4, probs), 0.09, 0.3).nodes.tolist() == [0, 1, 3]
    probs[1, 3] = 0.0
    probs[0, 1], probs[0, 2] = 0.3, 0.6  # equal length 1: the more probable one
    assert accept_typical(tree, np.arange(4), fake_out([0] * 4, probs), 0.09, 0.3).nodes.tolist() == [0, 2]
    # High entropy lowers the threshold: alpha * exp(-H) = 0.3 * e^-3 ~ 0.015.
    probs[0, 1], probs[0, 2] = 0.02, 0.01
    out = fake_out([0] * 4, probs, entropy=[3.0, 3.0, 3.0, 3.0])
    assert accept_typical(tree, np.arange(4), out, 0.09, 0.3).nodes.tolist() == [0, 1]
    out = fake_out([0] * 4, probs, entropy=[0.0] * 4)
    assert accept_typical(tree, np.arange(4), out, 0.09, 0.3).nodes.tolist() == [0]


# ---------------------------------------------------------------------------------------------- typical


@pytest.mark.parametrize("medusa", [True, False])
def test_typical_acceptance_runs_respects_length_and_is_reproducible(tiny, make_tokenizer, medusa):
    tree = Tree.from_choices(load_choices("cpu_small_10"), topk=10, num_heads=4)
    gen = Generator(tiny.backend(4, "shared"), make_tokenizer(), tree)
    results = {}
    for seed in (3, 3, 4):
        cfg = GenerationConfig(max_new_tokens=17, temperature=0.8, seed=seed, medusa=medusa)
        res = gen.generate([5, 6, 7, 8, 9], cfg)
        assert res.new_tokens == 17 == len(res.token_ids) and res.finish_reason == "length"
        assert all(0 <= t < 320 for t in res.token_ids)
        if seed in results:
            assert res.token_ids == results[seed]
        results[seed] = res.token_ids
    assert results[3] != results[4]  # sampling is actually random (vanishingly unlikely to collide)


def test_typical_with_oracle_heads_accepts(tiny, clock_free_steps):
    """With a low temperature the base model is confident, so the true future tokens pass typical acceptance."""
    from medusa_export.runtime.decode import DecodeStats, decode

    prompt = TINY_PROMPTS[0]
    tree = Tree.from_choices(load_choices("chain-3"), topk=10, num_heads=3)
    full = list(prompt) + tiny.reference(prompt, 40)
    session = OracleSession(tiny.backend(3, "shared").new_session(), full)
    stats = DecodeStats()
    cfg = GenerationConfig(temperature=0.05, seed=0)
    n = 0
    for chunk in decode(session, list(prompt), tree, cfg, stats):
        n += len(chunk)
        if n >= 20:
            break
    assert stats.mean_accepted > 1.5


# ---------------------------------------------------------------------------------------------- stopping


@pytest.mark.parametrize("medusa", [True, False])
def test_eos_stops(tiny, make_tokenizer, medusa):
    prompt = TINY_PROMPTS[0]
    ref = tiny.reference(prompt, N_NEW)
    eos = ref[6]
    first = ref.index(eos)
    tree = Tree.from_choices(load_choices("cpu_small_10"), topk=10, num_heads=4)
    gen = Generator(tiny.backend(4, "own"), make_tokenizer(eos_ids=(eos,)), tree)
    res = gen.generate(list(prompt), GenerationConfig(max_new_tokens=N_NEW, medusa=medusa))
    assert res.finish_reason == "stop"
    assert res.token_ids == ref[:first] and eos not in res.token_ids
    # One definition of tokens per step: what the steps produced (EOS included), over the steps.
    assert res.mean_accepted == pytest.approx(res.step_tokens / res.steps, abs=1e-4)
    if not medusa:
        assert res.mean_accepted == 1.0 and res.step_tokens == res.steps == res.new_tokens  # EOS ended the last step


def test_bench_rows_use_the_same_definition(tiny, make_tokenizer):
    from medusa_export.runtime.bench import summarize

    prompt = TINY_PROMPTS[0]
    eos = tiny.reference(prompt, N_NEW)[6]
    gen = Generator(tiny.backend(), make_tokenizer(eos_ids=(eos,)), None)
    res = gen.generate(list(prompt), GenerationConfig(max_new_tokens=N_NEW, medusa=False))
    assert res.finish_reason == "stop"
    assert summarize("torch", "vanilla", [res, res], 1.0, True)["mean_accepted"] == 1.0  # was (new-1)/steps < 1


@pytest.mark.parametrize("n", [1, 2, 7, 13])
def test_max_new_tokens_exact(tiny, make_tokenizer, n):
    prompt = TINY_PROMPTS[2]
    tree = Tree.from_choices(load_choices("mc_sim_7b_63"), topk=10, num_heads=4)
    gen = Generator(tiny.backend(4, "shared"), make_tokenizer(), tree)
    res = gen.generate(list(prompt), GenerationConfig(max_new_tokens=n))
    assert res.finish_reason == "length" and res.new_tokens == n and res.token_ids == tiny.reference(prompt, n)


def test_stop_string_truncates_text_and_streams_consistently(tiny, make_tokenizer):
    prompt = TINY_PROMPTS[1]
    ref = tiny.reference(prompt, N_NEW)
    tok = make_tokenizer()
    full_text = tok.decode(ref)
    stop = f"t{ref[5]} t{ref[6]}"
    cut = full_text.find(stop)
    assert cut > 0
    tree = Tree.from_choices(load_choices("cpu_small_10"), topk=10, num_heads=4)
    gen = Generator(tiny.backend(4, "shared"), tok, tree)
    for medusa in (True, False):
        cfg = GenerationConfig(max_new_tokens=N_NEW, stop_strings=("never-there", stop), medusa=medusa)
        res = gen.generate(list(prompt), cfg)
        assert res.finish_reason == "stop"
        assert res.text == full_text[:cut] and stop not in res.text
        stream = gen.stream(list(prompt), cfg)
        events = list(stream)
        assert "".join(e.text for e in events) == stream.result.text == res.text
        assert sum((e.token_ids for e in events), []) == stream.result.token_ids == res.token_ids
        assert res.token_ids == ref[: len(res.token_ids)]


def test_stream_text_equals_result(tiny, make_tokenizer):
    tree = Tree.from_choices(load_choices("chain-2"), topk=10, num_heads=2)
    gen = Generator(tiny.backend(2, "own"), make_tokenizer(), tree)
    stream = gen.stream(list(TINY_PROMPTS[3]), GenerationConfig(max_new_tokens=15))
    events = list(stream)
    assert stream.result.new_tokens == 15
    assert "".join(e.text for e in events) == stream.result.text
    assert sum((e.token_ids for e in events), []) == stream.result.token_ids


@pytest.mark.parametrize("spec, k", [("cpu_small_10", 4), ("chain-2", 2), (None, None)])
@pytest.mark.parametrize("extra", [1, 3, 6])
def test_full_kv_buffer_ends_with_length(tiny, make_tokenizer, spec, k, extra):
    prompt = TINY_PROMPTS[2]
    tree = Tree.from_choices(load_choices(spec), topk=10, num_heads=k) if spec else None
    backend = tiny.backend(k, "shared", max_seq=len(prompt) + extra)
    gen = Generator(backend, make_tokenizer(), tree)
    res = gen.generate(list(prompt), GenerationConfig(max_new_tokens=50, medusa=tree is not None))
    assert res.finish_reason == "length"
    assert 1 <= res.new_tokens <= extra + 1
    assert res.token_ids == tiny.reference(prompt, res.new_tokens)
    if tree is None:
        assert res.new_tokens == extra + 1  # every position fills; the last token needs no KV row


def test_input_errors(tiny, make_tokenizer):
    tree = Tree.from_choices(load_choices("chain-2"), topk=10, num_heads=2)
    backend = tiny.backend(2, "shared", max_seq=16)
    gen = Generator(backend, make_tokenizer(), tree)
    with pytest.raises(InputError, match="17 tokens.*16"):
        gen.generate(list(range(1, 18)))
    with pytest.raises(InputError, match="16 tokens"):
        gen.generate(list(range(1, 17)))  # no room for even one new token
    gen.generate(list(range(1, 16)), GenerationConfig(max_new_tokens=3))  # exactly fits
    with pytest.raises(InputError, match="empty"):
        gen.generate([])
    with pytest.raises(InputError, match="max_new_tokens"):
        gen.generate([1, 2], GenerationConfig(max_new_tokens=0))
    headless = Generator(backend, make_tokenizer(), None)
    with pytest.raises(InputError, match="needs Medusa heads"):
        headless.generate([1, 2], GenerationConfig(medusa=True, temperature=0.7))
    with pytest.raises(InputError, match="needs Medusa heads"):
        headless.generate([1, 2], GenerationConfig(medusa=True, context_drafts=False))
    # Greedy speculation without heads: context drafts alone, the same tokens.
    assert headless.generate([1, 2], GenerationConfig(max_new_tokens=6)).token_ids == tiny.reference([1, 2], 6)
    # A text prompt goes through the tokenizer.
    res = gen.generate("t5 t6 t7 t8 t9", GenerationConfig(max_new_tokens=4))
    assert res.prompt_tokens == 5 and res.token_ids == tiny.reference([5, 6, 7, 8, 9], 4)


@pytest.mark.parametrize("spec, topk", [("chain-4", 5), ("chain-2", 6), ("mc_sim_7b_63", 10)])
def test_tree_that_does_not_fit_the_heads_is_refused_up_front(tiny, make_tokenizer, spec, topk):
    """A tree deeper than the heads, or with more ranks than the backend's top-k, used to crash with an
    IndexError in candidate assembly mid-generation."""
    from medusa_export.runtime.errors import TreeError

    backend = tiny.backend(2, "shared", head_topk=5)
    tree = Tree.from_choices(load_choices(spec), topk=topk)
    with pytest.raises(TreeError, match="2 heads with top-5"):
        Generator(backend, make_tokenizer(), tree)
    # Fitting trees (fewer ranks than the backend computes) are fine and lossless.
    ok = Tree.from_choices([(0,), (1,), (0, 2)], topk=3, num_heads=2)
    res = Generator(backend, make_tokenizer(), ok).generate(list(TINY_PROMPTS[0]), GenerationConfig(max_new_tokens=10))
    assert res.token_ids == tiny.reference(TINY_PROMPTS[0], 10)
