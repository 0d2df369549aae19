"""The scheduler under load and over time, in-process (`Scheduler` with the tiny artifact): outcomes that add up
in the metrics whatever mix of finished, cancelled, timed-out and refused requests, one request's failing step
ending it alone, nothing growing over a few hundred requests, queued requests ending at their deadline during a
long step, an engine that outlives its event loop or a stuck step; and `serve` stopped by a second Ctrl-C."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from serve_helpers import LONG, PROMPT, build_chat_artifact, load_runtime  # noqa: E402

from medusa_export.runtime.decode import GenerationConfig  # noqa: E402
from medusa_export.runtime.serve.metrics import ServerMetrics  # noqa: E402
from medusa_export.runtime.serve.requests import ApiError, Job  # noqa: E402
from medusa_export.runtime.serve.scheduler import Finished, Request, Scheduler  # noqa: E402


@pytest.fixture(scope="module")
def runtime(tiny_dirs, tmp_path_factory):
    rt = load_runtime(build_chat_artifact(tiny_dirs, tmp_path_factory.mktemp("load")))
    yield rt
    rt.close()


def _job(runtime, tokens: int, **cfg) -> Job:
    ids = runtime.generator.tokenizer.encode(PROMPT)
    config = GenerationConfig(max_new_tokens=tokens, ignore_eos=True, medusa=False, **cfg)
    return Job(ids, config, False, False, False)


async def _finished(request: Request, seconds: float = 60) -> Finished:
    async def last() -> Finished:
        async for item in request.events():
            if isinstance(item, Finished):
                return item
        raise AssertionError("no Finished event")

    return await asyncio.wait_for(last(), seconds)


def _value(metrics: ServerMetrics, name: str, **labels: str) -> float:
    """A sample's value (0 when it was never set)."""
    return metrics.registry.get_sample_value("medusa_export:" + name, {**metrics.labels, **labels}) or 0.0


def test_stopping_after_the_event_loop_closed_ends_every_request_quietly(runtime):
    """A forced shutdown (a second Ctrl-C) closes the event loop with requests still queued and running; stopping
    the engine then raised RuntimeError('Event loop is closed') from handing them back, so `run_server` skipped
    closing the runtime and died with a traceback. They are counted out, and recorded as aborted, not failed."""
    metrics = ServerMetrics("m")
    sched = Scheduler(runtime.generator, 1, 64, 3, 300.0, metrics)

    async def main() -> None:
        for _ in range(4):
            sched.submit(_job(runtime, LONG))
        await asyncio.sleep(0.2)

    asyncio.run(main())
    sched.stop()
    assert sched.admitted == 0 and not sched.live and sched.thread.error is None
    assert _value(metrics, "request_success_total", finished_reason="error") == 0
    assert _value(metrics, "e2e_request_latency_seconds_count") == 4


def test_one_requests_failing_step_ends_it_alone(runtime):
    """A request whose own step raises (a temperature past validation makes its sampling fail) ends with the error;
    the requests decoding beside it finish their whole answers, and the metrics count one error."""
    metrics = ServerMetrics("m")
    broken = _job(runtime, 8, temperature=0.7)
    broken.config.temperature = 1e-300  # past validation, as tests/test_engine.py does

    async def main() -> list[Finished]:
        sched = Scheduler(runtime.generator, 3, 64, 2, 300.0, metrics)
        try:
            requests = [sched.submit(_job(runtime, 12)), sched.submit(broken), sched.submit(_job(runtime, 12))]
            return [await _finished(r) for r in requests]
        finally:
            sched.stop()

    ends = asyncio.run(main())
    assert ends[1].error is not None and ends[1].result is None
    assert [e.result.finish_reason for e in (ends[0], ends[2])] == ["length", "length"]
    assert [e.result.new_tokens for e in (ends[0], ends[2])] == [12, 12]
    assert _value(metrics, "request_success_total", finished_reason="error") == 1
    assert _value(metrics, "request_success_total", finished_reason="length") == 2


def test_mixed_outcomes_add_up_in_the_metrics(runtime):
    """Requests that finish, are cancelled while queued or running, time out while queued or running, and are
    refused: each is counted exactly once, under its reason, and the gauges return to zero."""
    metrics = ServerMetrics("m")

    async def main() -> tuple[Scheduler, list[Finished], int]:
        sched = Scheduler(runtime.generator, 2, 64, 4, 0.3, metrics)
        try:
            running = [sched.submit(_job(runtime, 2000)), sched.submit(_job(runtime, 2000))]
            queued = [sched.submit(_job(runtime, 2000)) for _ in range(4)]
            refused = 0
            for _ in range(3):
                with pytest.raises(ApiError) as e:
                    sched.submit(_job(runtime, 4))
                refused += e.value.status == 429
            running[0].cancel()  # its client went away while it decoded
            queued[0].cancel()  # ... while it waited
            ends = [await _finished(r) for r in running + queued]
            sched.timeout_s = 60.0  # however slow the machine, the short one ends by itself
            short = sched.submit(_job(runtime, 4))
            ends.append(await _finished(short))
            return sched, ends, refused
        finally:
            sched.stop()

    sched, ends, refused = asyncio.run(main())
    reasons = [e.result.finish_reason for e in ends]
    # Each LONG request needs 2,000 steps: none ends by itself within the timeout of 0.3 s, on any machine
    assert reasons == ["abort", "timeout", "abort", "timeout", "timeout", "timeout", "length"], reasons
    assert [e.reason for e in ends] == ["abort", "timeout", "abort", "timeout", "timeout", "timeout", None]
    assert refused == 3 and _value(metrics, "request_rejected_total", reason="queue_full") == 3
    counted = {r: _value(metrics, "request_success_total", finished_reason=r) for r in ("abort", "timeout", "length")}
    assert counted == {"abort": 2, "timeout": 4, "length": 1}
    assert _value(metrics, "e2e_request_latency_seconds_count") == 7
    assert _value(metrics, "request_queue_time_seconds_count") == 7
    assert _value(metrics, "generation_tokens_total") == sum(e.result.new_tokens for e in ends)
    assert _value(metrics, "num_requests_running") == 0 and _value(metrics, "num_requests_waiting") == 0
    assert sched.admitted == 0 and not sched.live


@pytest.mark.filterwarnings("ignore::FutureWarning")  # gc.get_objects() meets torch's deprecated attributes
def test_a_few_hundred_requests_leave_nothing_behind(runtime):
    """Waves of short requests, half of them cancelled at once: afterwards no request object is alive, every KV
    slot is free, and no thread was added (a bounded loop: 240 requests)."""
    metrics = ServerMetrics("m")

    async def main() -> Scheduler:
        sched = Scheduler(runtime.generator, 4, 64, 8, 60.0, metrics)
        for wave in range(20):
            requests = [sched.submit(_job(runtime, 3)) for _ in range(12)]
            for request in requests[wave % 2::2]:
                request.cancel()
            for request in requests:
                await _finished(request)
        return sched

    threads = threading.active_count()
    sched = asyncio.run(main())
    try:
        assert threading.active_count() == threads + 1  # the engine's own thread, nothing more
        assert sched.admitted == 0 and not sched.live
        assert _value(metrics, "e2e_request_latency_seconds_count") == 240
    finally:
        sched.stop()  # joined: it holds no request in a step's locals any more
    assert sched.engine.idle and threading.active_count() == threads
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, Request)]


def test_a_queued_request_ends_at_its_deadline_during_a_long_step(runtime):
    """A request waiting behind a step that runs long (a whole prompt's prefill without a lanes graph) gets its
    timeout when it is due, not when that step ends; the same for one whose client went away, so that its place
    is free for the next request at once."""
    release, entered = threading.Event(), threading.Event()

    async def main() -> tuple[Finished, Finished, Request]:
        sched = Scheduler(runtime.generator, 1, 64, 2, 0.5, ServerMetrics("m"))
        alone = sched.engine._alone

        def held(seq):  # the running request's next step lasts until the test releases it
            entered.set()
            release.wait(30)
            return alone(seq)

        sched.engine._alone = held
        try:
            running = sched.submit(_job(runtime, LONG))
            timed_out = sched.submit(_job(runtime, 4))
            sched.timeout_s = 60.0
            gone = sched.submit(_job(runtime, 4))
            gone.cancel()
            ends = (await _finished(timed_out, 10), await _finished(gone, 10))
            replacement = sched.submit(_job(runtime, 4))  # the vanished client's place is free
            assert entered.is_set() and not release.is_set()  # all of it while the step was still held
            return ends[0], ends[1], replacement
        finally:
            release.set()
            sched.stop()

    timed_out, gone, _ = asyncio.run(main())
    assert timed_out.reason == "timeout" and timed_out.result.finish_reason == "timeout"
    assert gone.reason == "abort" and gone.result.finish_reason == "abort"


class _StuckEngine:
    """An engine whose step blocks until released (a native call that hangs), recording when it is closed."""

    def __init__(self) -> None:
        self.release, self.stepping = threading.Event(), threading.Event()
        self.closed_during_step = self.closed = False
        self.idle = False

    def step(self) -> bool:
        self.stepping.set()
        self.release.wait(30)
        self.stepping.clear()
        return False

    def close(self) -> None:
        self.closed_during_step |= self.stepping.is_set()
        self.closed = True

    def fail(self, error: Exception) -> None:
        raise AssertionError(error)


def test_stopping_an_engine_thread_never_closes_the_engine_under_a_step():
    """`stop` past its timeout while a step still runs: it returns False at once and leaves the engine open, and
    the thread closes it when the step ends (closing the backend's sessions under a running step crashed)."""
    from medusa_export.runtime.engine_thread import EngineThread

    engine = _StuckEngine()
    thread = EngineThread(engine)  # type: ignore[arg-type]
    thread.wake.set()
    assert engine.stepping.wait(10)
    assert thread.stop(timeout=0.2) is False and not engine.closed
    engine.release.set()
    thread.thread.join(10)
    assert not thread.thread.is_alive() and engine.closed and not engine.closed_during_step


def test_a_second_stop_after_one_that_timed_out_leaves_the_close_to_the_thread():
    """`stop` timed out (the lifespan's), the step ended, `stop` again (`run_server`'s): the thread closed the
    engine as it left, so the second call must not close it again beside it (and report it closed, so that the
    backend is closed under the thread's close): one close, and False."""
    from medusa_export.runtime.engine_thread import EngineThread

    engine = _StuckEngine()
    closes = []
    close = engine.close
    engine.close = lambda: (closes.append(1), close())  # type: ignore[method-assign]
    thread = EngineThread(engine)  # type: ignore[arg-type]
    thread.wake.set()
    assert engine.stepping.wait(10)
    assert thread.stop(timeout=0.2) is False
    engine.release.set()
    thread.thread.join(10)
    assert thread.stop(timeout=1) is False and len(closes) == 1


def test_a_second_ctrl_c_with_requests_running_and_queued_exits_130_without_a_traceback(tiny_dirs, tmp_path):
    """Ctrl-C twice (a forced exit) while one request decodes and others wait: serve exits 130 within seconds, with no
    traceback ('Event loop is closed' from handing the queued requests back after the loop had gone)."""
    import json
    import signal
    import time
    from concurrent.futures import ThreadPoolExecutor

    from serve_helpers import metric, post, serving

    artifact = build_chat_artifact(tiny_dirs, tmp_path)
    body = {"prompt": PROMPT, "max_tokens": 2000, "temperature": 0, "ignore_eos": True, "medusa": False}
    with serving(artifact, "--threads", "1", "--max-num-seqs", "1", "--max-queue", "5") as (base, proc), \
            ThreadPoolExecutor(6) as pool:
        answers = [pool.submit(post, base + "/v1/completions", body, None) for _ in range(6)]
        deadline = time.monotonic() + 30
        while metric(base, "num_requests_waiting") < 2 and time.monotonic() < deadline:  # bounded
            time.sleep(0.02)
        assert metric(base, "num_requests_waiting") >= 2
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        out = proc.stdout.read()
        for answer in answers:  # each client gets an answer or a closed connection, never a hang
            try:
                answer.result(timeout=30)
            except (OSError, json.JSONDecodeError):
                pass
    assert "Traceback" not in out and "Event loop is closed" not in out, out[-3000:]
