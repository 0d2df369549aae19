"""Prefix reuse (`runtime/prefix_reuse.py`): a request that starts from the KV rows a finished request left in its
slot gets the answer a fresh prefill gives, bit for bit (tokens and log-probabilities): greedy with the heads' tree and
context drafts, plain, sampled, alone and batched, on fp32 and int8 graphs; what it skipped is counted in its result,
in the server's usage and in its metrics; a backend whose rows depend on how they went in never reuses them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from conftest import TINY_VOCAB, build_tiny

from medusa_export.runtime.backends.base import KVCache, ModelDims
from medusa_export.runtime.backends.slot_cache import SlotCache
from medusa_export.runtime.decode import GenerationConfig
from medusa_export.runtime.generator import GenerationResult
from medusa_export.runtime.prefix_reuse import SlotPrefixes, shared_prefix

pytest.importorskip("onnxruntime")


# ------------------------------------------------------------------------------------------- which slot, how many rows


def test_the_longest_shared_prefix_wins_and_the_prompts_last_token_is_fed_again():
    p = SlotPrefixes(3, enabled=True)
    p.release(0, [1, 2, 3, 4])
    p.release(1, [1, 2, 9])
    p.release(2, [])
    free = [0, 1, 2]
    assert p.take(free, [1, 2, 3, 4, 5]) == (0, 4) and free == [1, 2]
    p.release(0, [1, 2, 3, 4])
    free = [0, 1, 2]
    assert p.take(free, [1, 2, 3, 4]) == (0, 3)  # the whole prompt held: its last row gives the first answer token
    p.release(0, [1, 2, 3, 4])
    assert p.take([0, 1, 2], [7]) == (1, 0)  # a one-token prompt reuses nothing: the slot unused longest
    assert shared_prefix([1, 2], [1, 2, 3]) == 2 and shared_prefix([], [1]) == 0 and shared_prefix([5], [6]) == 0


def test_without_a_shared_prefix_the_slot_unused_longest_is_overwritten():
    p = SlotPrefixes(3, enabled=True)
    for slot, tokens in ((2, [5, 5]), (0, [6, 6]), (1, [7, 7])):
        p.release(slot, tokens)
    free = [0, 1, 2]
    assert p.take(free, [9, 9, 9]) == (2, 0)  # freed first
    assert p.take(free, [7, 7, 1]) == (1, 2)  # slot 0's [6, 6] stays for a later request
    assert p.tokens[0] == [6, 6] and p.tokens[1] == p.tokens[2] == []  # taken slots hold nothing reusable


def test_among_slots_sharing_as_much_the_one_unused_longest_is_taken():
    """A new chat shares only the system prompt with every slot: it overwrites the oldest conversation, not the one
    whose turn just ended (its next turn is the likeliest request to come)."""
    p = SlotPrefixes(3, enabled=True)
    for slot, tokens in ((1, [1, 2, 3, 10, 11]), (0, [1, 2, 3, 20, 21]), (2, [1, 2, 3, 30, 31])):
        p.release(slot, tokens)
    assert p.take([0, 1, 2], [1, 2, 3, 40]) == (1, 3)


def test_reuse_is_off_when_disabled_for_a_scored_prompt_and_after_a_failed_step():
    p = SlotPrefixes(2, enabled=False)
    p.release(0, [1, 2, 3])
    assert p.take([1, 0], [1, 2, 3, 4]) == (0, 0)  # off: the lowest slot, used or not (memory pages stay few)
    p = SlotPrefixes(2, enabled=True)
    p.release(0, [1, 2, 3])
    assert p.take([0, 1], [1, 2, 3, 4], allowed=False)[1] == 0  # prompt_logprobs: every prompt row is computed
    p.release(0, None)  # a failed step may have half-written its rows
    assert p.take([0, 1], [1, 2, 3, 4])[1] == 0


def test_caches_rewind_to_a_prefix():
    dims = ModelDims(num_layers=2, num_kv_heads=1, head_dim=4, vocab_size=16, num_heads=0, head_topk=1,
                     sample_topk=1, dtype="float32")
    kv = KVCache(dims, 8)
    kv.stage(5)
    kv.keep(np.arange(5))
    kv.rewind(3)
    assert kv.length == 3 and kv.staged == 0
    kv.rewind(6)  # never past what is committed
    assert kv.length == 3
    slots = SlotCache(dims, 8, slots=2)
    slots.prepare(5, 2)
    slots.keep(np.arange(5))
    slots.prepare(1, 2)  # slot 1 is synced to the 5 committed rows
    slots.keep(np.arange(1))
    slots.rewind(2)
    assert slots.length == 2 and slots.synced == [0, 2] and slots.used == 1


# ------------------------------------------------------------------------------------------- answers through the engine


@pytest.fixture(scope="module", params=["fp32", "int8-rows-kernel"])
def rt(request, artifact, tiny_dirs, tmp_path_factory):
    from medusa_export.runtime.api import MedusaRuntime

    art = artifact if request.param == "fp32" else build_tiny(
        tiny_dirs, tmp_path_factory.mktemp("reuse") / "int8", dtype="int8", max_seq=128, attention="kernel",
        int8_matmul="rows")
    with MedusaRuntime.load(art, threads=1) as runtime:
        assert runtime.generator.backend.reuses_rows
        yield runtime


def _through(engine, requests: list[tuple[list[int], GenerationConfig]]) -> list[GenerationResult]:
    """Requests added together, run until the engine is idle (bounded): their results, in order."""
    results: dict[int, GenerationResult] = {}
    for i, (prompt, cfg) in enumerate(requests):
        engine.add(prompt, cfg, lambda item, i=i: results.__setitem__(i, item) if isinstance(
            item, (GenerationResult, Exception)) else None)
    for _ in range(5000):  # bounded
        if not engine.step():
            break
    assert all(isinstance(results.get(i), GenerationResult) for i in range(len(requests))), results
    return [results[i] for i in range(len(requests))]


def _same(got: GenerationResult, fresh: GenerationResult) -> None:
    assert got.token_ids == fresh.token_ids and got.text == fresh.text and got.finish_reason == fresh.finish_reason
    assert [(e.token_id, e.logprob, e.top) for e in got.logprobs] == \
        [(e.token_id, e.logprob, e.top) for e in fresh.logprobs]  # bit for bit, alternatives included


def _fresh(rt, prompt: list[int], cfg: GenerationConfig) -> GenerationResult:
    """The answer of a fresh session (`generate`, no engine): the engine samples without the heads."""
    return rt.generator.generate(prompt, cfg if cfg.temperature == 0 else replace(cfg, medusa=False))


CONFIGS = {
    "greedy-medusa": GenerationConfig(max_new_tokens=24, ignore_eos=True, logprobs=2),
    "greedy-plain": GenerationConfig(max_new_tokens=24, ignore_eos=True, logprobs=2, medusa=False),
    "sampled": GenerationConfig(max_new_tokens=24, ignore_eos=True, logprobs=2, temperature=0.9, seed=7),
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_a_follow_up_turn_reuses_the_conversation_and_answers_as_fresh(rt, kind, clock_free_steps):
    """Turn 2 repeats turn 1's prompt and answer: it prefills only what follows them, and its answer (and turn 3's,
    which reuses turn 2's slot) is the one a fresh runtime's `generate` gives."""
    from medusa_export.runtime.engine import Engine

    cfg = CONFIGS[kind]
    engine = Engine(rt.generator, max_num_seqs=2, max_num_batched_tokens=16)
    try:
        prompt = [3, 8, 5, 9, 12, 4, 7, 3, 8, 5]
        for turn in range(3):
            (got,) = _through(engine, [(prompt, cfg)])
            _same(got, _fresh(rt, prompt, cfg))
            if turn == 0:
                assert got.cached_tokens == 0
            else:
                assert got.cached_tokens >= held - 1, (turn, got.cached_tokens, held)
            held = len(prompt) + len(got.token_ids)
            prompt = prompt + got.token_ids + [turn + 20, 6, 11]
    finally:
        engine.close()


def test_requests_sharing_a_system_prompt_in_one_batch_answer_as_fresh(rt, clock_free_steps):
    """A finished request leaves a shared prefix; of three requests then arriving together, one takes its slot and
    skips that prefix, the others start empty; every answer, greedy or sampled, with or without the heads, is its own
    fresh one."""
    from medusa_export.runtime.engine import Engine

    system = [2, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40]
    engine = Engine(rt.generator, max_num_seqs=3, max_num_batched_tokens=8)
    try:
        _through(engine, [(system + [50, 51], CONFIGS["greedy-plain"])])
        requests = [(system + [41, 42], CONFIGS["greedy-medusa"]), (system + [43], CONFIGS["sampled"]),
                    (system + [44, 45, 46], replace(CONFIGS["greedy-medusa"], context_drafts=False))]
        results = _through(engine, requests)
        for (prompt, cfg), got in zip(requests, results):
            _same(got, _fresh(rt, prompt, cfg))
        assert sorted(r.cached_tokens for r in results) == [0, 0, len(system)]
    finally:
        engine.close()


def test_choices_of_one_prompt_and_a_burst_under_one_system_prompt_prefill_it_once(rt, clock_free_steps):
    """Requests arriving together whose prompts share at least `MIN_SHARED_RUNNING` tokens: the first prefills them,
    the others wait in the queue until its rows hold them, copy them, and prefill the rest; every answer is its fresh
    one. A request that shares less with the running ones starts at once."""
    from medusa_export.runtime.engine import Engine
    from medusa_export.runtime.prefix_reuse import MIN_SHARED_RUNNING

    system = [(7 * i) % (TINY_VOCAB - 2) + 1 for i in range(MIN_SHARED_RUNNING + 8)]
    engine = Engine(rt.generator, max_num_seqs=4, max_num_batched_tokens=16)
    try:
        same = system + [41, 42]
        requests = [(same, CONFIGS["greedy-medusa"]), (same, CONFIGS["sampled"]), (same, CONFIGS["greedy-plain"]),
                    (system[:MIN_SHARED_RUNNING - 2] + [43, 44, 45], CONFIGS["greedy-plain"])]
        results = _through(engine, requests)
        for (prompt, cfg), got in zip(requests, results):
            _same(got, _fresh(rt, prompt, cfg))
        assert [r.cached_tokens for r in results] == [0, len(same) - 1, len(same) - 1, 0]
        burst = [(system + [50 + i], CONFIGS["greedy-plain"]) for i in range(3)]
        results = _through(engine, burst)
        for (prompt, cfg), got in zip(burst, results):
            _same(got, _fresh(rt, prompt, cfg))
        # the first takes the slot a finished request left with the system prompt; the others copy from it
        assert [r.cached_tokens for r in results] == [len(system)] * 3
    finally:
        engine.close()


def test_a_request_copies_a_decoding_sequences_rows_and_outlives_it(rt, clock_free_steps):
    """The request arrives while another decodes with the prefix it shares: it copies those rows at once (no wait),
    and the other's cancellation mid-way does not touch them."""
    from medusa_export.runtime.engine import Engine
    from medusa_export.runtime.prefix_reuse import MIN_SHARED_RUNNING

    prompt = [(5 * i) % (TINY_VOCAB - 2) + 1 for i in range(MIN_SHARED_RUNNING + 4)]
    cfg = CONFIGS["greedy-medusa"]
    engine = Engine(rt.generator, max_num_seqs=2, max_num_batched_tokens=64)
    results = {}
    try:
        first = engine.add(prompt, replace(cfg, max_new_tokens=60), lambda item: results.__setitem__(0, item))
        for _ in range(3):
            engine.step()
        assert first.cursor is not None  # decoding
        follow = prompt + [9, 10]
        engine.add(follow, cfg, lambda item: results.__setitem__(1, item) if isinstance(
            item, (GenerationResult, Exception)) else None)
        engine.step()
        engine.cancel(first)
        for _ in range(500):  # bounded
            if not engine.step():
                break
        _same(results[1], _fresh(rt, follow, cfg))
        assert results[1].cached_tokens == len(prompt)
    finally:
        engine.close()


def _admitted_after(engine, seq, limit: int = 2000) -> int | None:
    """Steps until ``seq`` takes a slot (bounded); None if it never does."""
    for n in range(limit):
        if seq.admitted_at is not None:
            return n
        if not engine.step():
            return None
    return None


def _drain(engine) -> None:
    for _ in range(5000):  # bounded
        if not engine.step():
            return


def test_a_request_waiting_for_rows_keeps_its_place_before_later_requests(rt, clock_free_steps):
    """A waits for the rows of D's prompt going in; B, queued after A, must not take the last slot meanwhile (A would
    then wait for a whole answer to end): A starts within a few chunks, reusing them, and B waits."""
    from medusa_export.runtime.engine import Engine

    plain = replace(CONFIGS["greedy-plain"], logprobs=None)
    long_prompt = [(7 * i) % (TINY_VOCAB - 2) + 1 for i in range(60)]
    engine = Engine(rt.generator, max_num_seqs=2, max_num_batched_tokens=8)
    results = {}
    sink = lambda key: lambda item: results.__setitem__(key, item) if isinstance(  # noqa: E731
        item, (GenerationResult, Exception)) else None
    try:
        engine.add(long_prompt, replace(plain, max_new_tokens=60), sink("d"))
        engine.step()  # D took a slot and its first chunk went in
        a = engine.add(long_prompt[:50] + [3, 4], plain, sink("a"))
        b = engine.add([9, 8, 7, 6, 5], replace(plain, max_new_tokens=60), sink("b"))
        steps = _admitted_after(engine, a)
        assert steps is not None and steps <= 8 and b.admitted_at is None, steps
        _drain(engine)
        assert results["a"].cached_tokens == 50
        assert results["a"].token_ids == _fresh(rt, long_prompt[:50] + [3, 4], plain).token_ids
    finally:
        engine.close()


def test_a_request_takes_rows_held_now_rather_than_wait_for_a_prompt_going_in(rt, clock_free_steps):
    """Two running sequences share the prefix: one still scoring its prompt (alone, every other step), the other
    holding the rows already. The request copies the held rows at once."""
    from medusa_export.runtime.engine import Engine

    plain = replace(CONFIGS["greedy-plain"], logprobs=None)
    shared = [(5 * i) % (TINY_VOCAB - 2) + 1 for i in range(40)]
    engine = Engine(rt.generator, max_num_seqs=3, max_num_batched_tokens=8)
    try:
        _through(engine, [(shared + [30], replace(plain, max_new_tokens=2))])  # leaves the prefix in a free slot
        engine.add(shared + list(range(50, 90)), replace(plain, max_new_tokens=30, prompt_logprobs=1), lambda _: None)
        holder = engine.add(shared + [31], replace(plain, max_new_tokens=60), lambda _: None)
        engine.step()
        assert holder.stats.cached_tokens == len(shared)  # from the free slot
        a = engine.add(shared + [32, 33], plain, lambda _: None)
        assert _admitted_after(engine, a) == 1 and a.stats.cached_tokens == len(shared)
        _drain(engine)
    finally:
        engine.close()


def test_a_scored_prompt_and_a_disabled_engine_prefill_everything(rt):
    from medusa_export.runtime.engine import Engine

    prompt = [4, 5, 6, 7, 8, 9]
    for reuse, cfg, cached in ((True, GenerationConfig(max_new_tokens=4, prompt_logprobs=1), 0),
                               (False, GenerationConfig(max_new_tokens=4), 0),
                               (True, GenerationConfig(max_new_tokens=4), len(prompt) - 1)):
        engine = Engine(rt.generator, max_num_seqs=1, reuse_prefixes=reuse)
        try:
            first, again = _through(engine, [(prompt, cfg)]), _through(engine, [(prompt, cfg)])
            assert again[0].cached_tokens == cached and again[0].token_ids == first[0].token_ids
            assert again[0].prompt_logprobs == first[0].prompt_logprobs
        finally:
            engine.close()


@pytest.mark.parametrize("kind", ["portable", "no lanes graph"])
def test_artifacts_whose_rows_are_not_shown_exact_never_reuse_them(kind, portable_artifact, tiny_dirs,
                                                                    tmp_path_factory):
    """A portable graph's masked tree steps compute rows in other last bits than one-token steps; without a lanes
    graph, build never checked that a prompt's rows equal one-row steps' (`_check_lanes`)."""
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.engine import Engine

    art = portable_artifact if kind == "portable" else build_tiny(
        tiny_dirs, tmp_path_factory.mktemp("reuse") / "one", max_seq=64, max_num_seqs=1)
    with MedusaRuntime.load(art, threads=1) as runtime:
        assert not runtime.generator.backend.reuses_rows
        engine = Engine(runtime.generator, max_num_seqs=1)
        try:
            prompt = [4, 5, 6, 7, 8, 9]
            _through(engine, [(prompt, GenerationConfig(max_new_tokens=4))])
            assert _through(engine, [(prompt, GenerationConfig(max_new_tokens=4))])[0].cached_tokens == 0
        finally:
            engine.close()


# ------------------------------------------------------------------------------------------- the server


def test_the_server_reports_cached_tokens_and_can_turn_reuse_off(artifact):
    from serve_helpers import KEY, metric, post, serving, wait_idle

    turn1 = {"prompt": "t3 t8 t5 t9 t12 t4", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    for options, reused in (((), True), (("--no-prefix-caching",), False)):
        with serving(artifact, "--api-key", KEY, "--max-num-seqs", "1", *options) as (base, proc):
            first = post(base + "/v1/completions", turn1)[1]
            turn2 = {**turn1, "prompt": f"{turn1['prompt']} {first['choices'][0]['text'].strip()} t20 t21"}
            second = post(base + "/v1/completions", turn2)[1]
            cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            assert (cached >= first["usage"]["prompt_tokens"]) == reused and (cached == 0) == (not reused)
            wait_idle(base)
            assert metric(base, "prefix_cache_hits_total") == cached
            assert metric(base, "prefix_cache_queries_total") == \
                first["usage"]["prompt_tokens"] + second["usage"]["prompt_tokens"]
        assert f"prefix caching {'on' if reused else 'off'}" in proc.stdout.read()


def test_a_batcher_reuses_prefixes_unless_asked_not_to(rt):
    from medusa_export.runtime.errors import InputError

    prompt = [4, 5, 6, 7, 8, 9, 10]
    for reuse in (True, False):
        with rt.batcher(max_num_seqs=1, reuse_prefixes=reuse) as batcher:
            first = batcher.submit(prompt, max_new_tokens=6)
            list(first)
            again = batcher.submit(prompt + first.result.token_ids + [3], max_new_tokens=6)
            list(again)
            assert (again.result.cached_tokens >= len(prompt)) == reuse and (again.result.cached_tokens == 0) != reuse
    with pytest.raises(InputError, match="reuse_prefixes must be True or False"):
        rt.batcher(reuse_prefixes="no")


def test_the_servers_n_choices_prefill_their_prompt_once(artifact):
    """n = 3 greedy choices of a new prompt: one prefills it, the other two copy its rows (the metrics count their
    hits; usage counts none: no earlier request left them), and all three give the same answer."""
    from serve_helpers import KEY, metric, post, serving, wait_idle

    from medusa_export.runtime.prefix_reuse import MIN_SHARED_RUNNING

    prompt = " ".join(f"t{(3 * i) % 40 + 1}" for i in range(MIN_SHARED_RUNNING + 6))
    with serving(artifact, "--api-key", KEY) as (base, _):
        status, body, _ = post(base + "/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0, "n": 3})
        assert status == 200, body
        wait_idle(base)
        hits = metric(base, "prefix_cache_hits_total")
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert hits == 2 * (body["usage"]["prompt_tokens"] - 1)
    assert len({c["text"] for c in body["choices"]}) == 1
