"""A batched request whose step, result or slot reset fails ends with that error (typed: a native library's panic is
an EngineError), and the engine thread and its slots carry on serving the next requests."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("onnxruntime")

from medusa_export.runtime.api import MedusaRuntime  # noqa: E402
from medusa_export.runtime.errors import EngineError  # noqa: E402


def test_the_engine_thread_survives_a_step_that_raises_a_base_exception():
    """What a native library's panic looks like to Python: the running requests end with it, the thread lives
    on and steps the requests still queued without waiting for another submit."""
    import threading

    from medusa_export.runtime.engine_thread import EngineThread

    class Panic(BaseException):
        pass

    class Engine:
        def __init__(self):
            self.failed, self.steps, self.stepped = [], 0, threading.Event()

        def step(self):
            self.steps += 1
            self.stepped.set()
            if self.steps == 1:
                raise Panic("native")
            return False

        def fail(self, error):
            self.failed.append(error)

        def close(self):
            pass

    engine = Engine()
    thread = EngineThread(engine)
    thread.wake.set()  # one wake: the failed step, then at once a step for what is still queued
    deadline = time.monotonic() + 10
    while engine.steps < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.steps == 2 and thread.thread.is_alive()
    # handed over as an EngineError: a consumer's `except Exception` misses a panic, and a sink took it for an event
    assert len(engine.failed) == 1 and isinstance(engine.failed[0], EngineError)
    assert "a step failed inside a native library (native)" in str(engine.failed[0])
    thread.stop()


def test_a_request_whose_result_cannot_be_made_ends_with_the_error(artifact, monkeypatch):
    """It had left the running list when its result failed to build (or a slot's reset panicked), so no one ever
    handed it an end: its wait() blocked for ever. Both end with an error now, and the batcher carries on."""
    from medusa_export.runtime import engine as engine_module

    made = engine_module.result_of
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("result broke")
        return made(*args, **kwargs)

    class Panic(BaseException):
        pass

    def panicking_reset(self, session, keep=0):
        raise Panic("reset")

    monkeypatch.setattr(engine_module, "result_of", flaky)
    with MedusaRuntime.load(artifact) as rt, rt.batcher(max_num_seqs=1) as batcher:
        first = batcher.submit([5, 6, 7], max_new_tokens=3, chat=False)
        with pytest.raises(ValueError, match="result broke"):
            first.wait()
        assert batcher.submit([5, 6, 7], max_new_tokens=3, chat=False).wait().new_tokens >= 1
        monkeypatch.setattr(engine_module.Engine, "_fresh", panicking_reset)
        third = batcher.submit([5, 6, 7], max_new_tokens=3, chat=False)
        with pytest.raises(EngineError, match="a step failed inside a native library"):
            third.wait()


def test_a_slot_the_backend_cannot_reset_fails_its_request_not_the_engine(artifact, monkeypatch):
    """The backend fails while a request is admitted (its slot's reset): that request ends with the error, the
    slot stays usable, the next request is answered, and nothing spins."""
    from medusa_export.runtime.engine import Engine

    reset = Engine._fresh
    calls = []

    def flaky(self, session, keep=0):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return reset(self, session, keep)

    monkeypatch.setattr(Engine, "_fresh", flaky)
    with MedusaRuntime.load(artifact) as rt, rt.batcher(max_num_seqs=1) as batcher:
        first = batcher.submit([5, 6, 7], max_new_tokens=3, chat=False)
        with pytest.raises(RuntimeError, match="device lost"):
            first.wait()
        second = batcher.submit([5, 6, 7], max_new_tokens=3, chat=False)
        assert second.wait().token_ids == rt.generate([5, 6, 7], max_new_tokens=3, chat=False).token_ids
    assert len(calls) == 2
