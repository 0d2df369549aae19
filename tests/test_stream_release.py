"""A stream the caller stops reading hands its session back at once."""

from __future__ import annotations

from conftest import TINY_PROMPTS

from medusa_export.runtime.api import MedusaRuntime


def test_a_stream_left_early_releases_its_session_at_once(artifact):
    """Breaking out of a stream and dropping it frees it by reference counting alone (no cycle through the
    generator: a cycle held the session and its KV buffers until the garbage collector ran); close() says abort."""
    import gc
    import weakref

    rt = MedusaRuntime.load(artifact, backend="ort", threads=1)
    gc.disable()
    try:
        stream = rt.stream(list(TINY_PROMPTS[0]), max_new_tokens=10, medusa=False)
        next(iter(stream))
        gone = weakref.ref(stream)
        del stream
        assert gone() is None
    finally:
        gc.enable()
    stream = rt.stream(list(TINY_PROMPTS[0]), max_new_tokens=10, medusa=False)
    first = next(iter(stream))
    stream.close()
    assert stream.result.finish_reason == "abort" and stream.result.token_ids == first.token_ids



def test_close_from_another_thread_ends_the_stream_being_read(artifact):
    """close() while another thread reads the stream: the reader's loop ends with "abort" after the step it waits
    for, never with Python's "generator already executing"."""
    import threading

    rt = MedusaRuntime.load(artifact, backend="ort", threads=1)
    stream = rt.stream(list(TINY_PROMPTS[0]), max_new_tokens=40, medusa=False, ignore_eos=True)
    first_read, events = threading.Event(), []

    def read() -> None:
        for event in stream:
            events.append(event)
            first_read.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert first_read.wait(60)
    stream.close()
    reader.join(60)
    assert not reader.is_alive()
    assert stream.result.finish_reason == "abort" and stream.result.new_tokens < 40


def test_a_stream_closed_mid_read_stops_at_the_next_step_and_one_reader_at_a_time(artifact):
    """The in-between state made deterministic: while a reader holds the stream, a second reader gets a typed
    error and close() only flags it; the reader's next step then ends the stream."""
    import pytest

    from medusa_export.runtime.errors import InputError

    rt = MedusaRuntime.load(artifact, backend="ort", threads=1)
    stream = rt.stream(list(TINY_PROMPTS[0]), max_new_tokens=40, medusa=False, ignore_eos=True)
    first = next(stream)
    with stream._reading:  # as if another thread were inside next()
        with pytest.raises(InputError, match="another thread"):
            next(stream)
        stream.close()
        assert stream.result is None  # not ended yet: the reader ends it
    rest = list(stream)
    assert len(rest) <= 1
    assert stream.result.finish_reason == "abort"
    assert stream.result.token_ids == first.token_ids + [t for e in rest for t in e.token_ids]


def test_a_close_during_the_readers_step_ends_the_stream_with_that_step(artifact, monkeypatch):
    """close() lands while the reader is inside next() (its step running): close() returns at once, the reader
    gets that step's event with ``result`` already set ("abort", every token it was given), and its next read
    stops; nothing is left waiting for another read."""
    import threading

    import medusa_export.runtime.generator as generator

    real_decode = generator.decode
    inside, closed = threading.Event(), threading.Event()

    def decode_held_at_the_second_step(*args, **kwargs):
        for i, chunk in enumerate(real_decode(*args, **kwargs)):
            if i == 1:
                inside.set()
                assert closed.wait(60)
            yield chunk

    monkeypatch.setattr(generator, "decode", decode_held_at_the_second_step)
    rt = MedusaRuntime.load(artifact, backend="ort", threads=1)
    stream = rt.stream(list(TINY_PROMPTS[0]), max_new_tokens=40, medusa=False, ignore_eos=True)
    events, results_seen = [], []

    def read() -> None:
        for event in stream:
            events.append(event)
            results_seen.append(stream.result)

    reader = threading.Thread(target=read)
    reader.start()
    assert inside.wait(60)
    stream.close()
    assert stream.result is None  # the reader's step is still running
    closed.set()
    reader.join(60)
    assert not reader.is_alive() and len(events) == 2
    assert results_seen[-1] is stream.result and stream.result.finish_reason == "abort"
    assert stream.result.token_ids == [t for e in events for t in e.token_ids]
