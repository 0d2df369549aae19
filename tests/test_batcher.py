"""The library's batcher (`runtime/batcher.py`): a submitted request's events, and its end, for the threads that
wait on it."""

from __future__ import annotations

import threading

import pytest

from medusa_export.runtime.batcher import BatchedStream
from medusa_export.runtime.errors import EngineError

PROMPT = list(range(5, 35))  # token ids: no chat template


def test_a_request_waited_on_from_several_threads_answers_every_one(artifact):
    """Any number of threads may wait() on one request while another iterates its events: each waiter gets the
    result, the iterator every event. (Two waiters used to share one queue: the result reached one, and the other
    waited for ever.)"""
    from medusa_export.runtime.api import MedusaRuntime

    with MedusaRuntime.load(artifact, threads=1) as rt, rt.batcher() as batcher:
        alone = rt.generate(PROMPT, max_new_tokens=10, ignore_eos=True).token_ids
        stream = batcher.submit(PROMPT, max_new_tokens=10, ignore_eos=True)
        results, events = [], []
        waiters = [threading.Thread(target=lambda: results.append(stream.wait().token_ids)) for _ in range(3)]
        reader = threading.Thread(target=lambda: events.extend(t for e in stream for t in e.token_ids))
        for t in [*waiters, reader]:
            t.start()
        for t in [*waiters, reader]:
            t.join(timeout=120)
        assert results == [alone] * 3 and events == alone
        assert list(stream) == [] and stream.wait().token_ids == alone  # the end is seen again, at once


def test_a_failed_request_raises_on_every_wait_from_every_thread():
    stream = BatchedStream()
    raised = []

    def waiter():
        try:
            stream.wait()
        except EngineError as e:
            raised.append(str(e))

    threads = [threading.Thread(target=waiter) for _ in range(3)]
    for t in threads:
        t.start()
    stream._sink(EngineError("the step failed"))
    for t in threads:
        t.join(timeout=30)
    assert raised == ["the step failed"] * 3
    with pytest.raises(EngineError):
        list(stream)
    with pytest.raises(EngineError):
        list(stream)  # and again


def _drain(engine, seconds: float = 120) -> bool:
    """Step ``engine`` on a thread until idle; False when it is still stepping after ``seconds`` (a deadlock)."""
    done = threading.Event()

    def run():
        while engine.step():
            pass
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done.wait(seconds)


@pytest.fixture(scope="module")
def rt(artifact):
    from medusa_export.runtime.api import MedusaRuntime

    with MedusaRuntime.load(artifact, threads=1) as runtime:
        yield runtime


def test_a_sink_may_queue_a_follow_up_when_it_is_handed_a_cancelled_requests_end(rt):
    """A request cancelled while queued got its result from inside the engine's queue lock: a sink queueing a
    follow-up request there (engine.add takes that lock) hung the engine for ever."""
    from medusa_export.runtime.decode import GenerationConfig
    from medusa_export.runtime.engine import Engine
    from medusa_export.runtime.generator import GenerationResult

    engine = Engine(rt.generator, max_num_seqs=1)
    ends = []

    def sink(item):
        if isinstance(item, GenerationResult):
            ends.append(item.finish_reason)
            if len(ends) < 3:
                engine.add(PROMPT, GenerationConfig(max_new_tokens=2), sink)

    engine.add(PROMPT, GenerationConfig(max_new_tokens=2), sink)
    engine.cancel(engine.add(PROMPT, GenerationConfig(max_new_tokens=2), sink))
    try:
        assert _drain(engine), "the engine deadlocked"
    finally:
        engine.close()
    assert sorted(ends) == ["abort", "length", "length", "length"]


def test_closing_an_engine_hands_queued_requests_their_end_outside_its_lock(rt):
    from medusa_export.runtime.decode import GenerationConfig
    from medusa_export.runtime.engine import Engine
    from medusa_export.runtime.errors import InputError
    from medusa_export.runtime.generator import GenerationResult

    engine = Engine(rt.generator, max_num_seqs=1)
    refused = []

    def sink(item):
        if isinstance(item, GenerationResult):
            try:
                engine.add(PROMPT, GenerationConfig(max_new_tokens=2), sink)
            except InputError as e:  # a closed engine would never run it
                refused.append(str(e))

    engine.add(PROMPT, GenerationConfig(max_new_tokens=2), sink)
    closer = threading.Thread(target=engine.close, daemon=True)
    closer.start()
    closer.join(60)
    assert not closer.is_alive(), "close deadlocked"
    assert len(refused) == 1 and "closed" in refused[0]


def test_the_engine_keeps_its_own_copy_of_a_requests_options(rt):
    """engine.add kept the caller's GenerationConfig: a field changed afterwards (the object reused for the next
    request) changed the running request."""
    from medusa_export.runtime.decode import GenerationConfig
    from medusa_export.runtime.engine import Engine
    from medusa_export.runtime.errors import InputError
    from medusa_export.runtime.generator import GenerationResult

    engine = Engine(rt.generator, max_num_seqs=1)
    ends = []
    cfg = GenerationConfig(max_new_tokens=3, ignore_eos=True)
    try:
        engine.add(PROMPT, cfg, lambda x: ends.append(x) if isinstance(x, GenerationResult) else None)
        cfg.max_new_tokens = 40  # the caller reuses its object for the next request
        assert _drain(engine)
        with pytest.raises(InputError, match="GenerationConfig"):
            engine.add(PROMPT, {"max_new_tokens": 3}, print)
    finally:
        engine.close()
    assert [r.new_tokens for r in ends] == [3]


def test_a_request_failing_as_it_starts_gets_its_error_and_frees_its_slot(rt, monkeypatch):
    """An error after the slot was reset (choosing the graph, the text output) lost the slot and never reached the
    request: its caller waited for ever and every later request queued behind a slot that was gone."""
    from medusa_export.runtime.decode import GenerationConfig
    from medusa_export.runtime.engine import Engine
    from medusa_export.runtime.generator import GenerationResult

    engine = Engine(rt.generator, max_num_seqs=1)
    got = []
    with monkeypatch.context() as m:
        m.setattr(type(rt.generator.spec), "heads_for", lambda self, tree: 1 / 0)
        engine.add(PROMPT, GenerationConfig(max_new_tokens=2, medusa=True), got.append)
        engine.step()
    assert len(got) == 1 and isinstance(got[0], ZeroDivisionError)
    engine.add(PROMPT, GenerationConfig(max_new_tokens=2), got.append)  # the one slot is free again
    try:
        assert _drain(engine)
    finally:
        engine.close()
    assert isinstance(got[-1], GenerationResult) and got[-1].finish_reason == "length"


def test_a_queued_request_withdrawn_gets_its_end_at_once(rt):
    from medusa_export.runtime.decode import GenerationConfig
    from medusa_export.runtime.engine import Engine
    from medusa_export.runtime.generator import GenerationResult

    engine = Engine(rt.generator, max_num_seqs=1)
    ends = []

    def sink(item):  # ends only (results, errors), not the stream's events
        if isinstance(item, (GenerationResult, Exception)):
            ends.append(item.finish_reason if isinstance(item, GenerationResult) else item)
    try:
        queued = engine.add(PROMPT, GenerationConfig(max_new_tokens=2), sink)
        engine.cancel(queued, "timeout")
        assert engine.withdraw(queued) and ends == ["timeout"]  # before any step
        assert not engine.withdraw(queued)  # handed back once
        running = engine.add(PROMPT, GenerationConfig(max_new_tokens=2), sink)
        engine.step()
        assert not engine.withdraw(running)  # admitted: it leaves at a step, with its slot
        assert _drain(engine)
    finally:
        engine.close()
    assert ends == ["timeout", "length"]


def test_a_request_without_drafts_runs_the_heads_where_they_beat_plain_steps(rt, monkeypatch):
    """Where the heads lose next to drafts (`heads_for` gives the vanilla graph), a greedy request with context drafts
    off got plain decoding: bench's heads-alone row read 1.00 tokens a step. Alone and in the engine it runs the
    heads' tree where that beats a plain step, and is not counted among the requests that learn the choice."""
    from medusa_export.runtime.decode import GenerationConfig
    from medusa_export.runtime.engine import Engine
    from medusa_export.runtime.generator import GenerationResult

    spec = rt.generator.spec
    monkeypatch.setattr(type(spec), "heads_for", lambda self, tree: None)  # the heads lose beside drafts
    monkeypatch.setattr(type(spec), "heads_without_drafts", lambda self, tree: tree)  # and beat plain steps alone
    cfg = GenerationConfig(max_new_tokens=4, context_drafts=False)
    assert rt.generator.generate(PROMPT, cfg).medusa
    assert not rt.generator.generate(PROMPT, GenerationConfig(max_new_tokens=4)).medusa  # with drafts: vanilla
    engine = Engine(rt.generator, max_num_seqs=1)
    got = []
    engine.add(PROMPT, cfg, lambda item: got.append(item) if isinstance(item, GenerationResult) else None)
    try:
        assert _drain(engine)
    finally:
        engine.close()
    assert got[0].medusa
