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

