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
