"""The server's drain (`Scheduler.drain`), in-process: what a shutdown does to requests that are running or queued
when its deadline passes, and to ones that end by themselves first. The process-level path (SIGTERM, exit codes)
is in tests/test_serve.py."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from serve_helpers import LONG, PROMPT, build_chat_artifact, load_runtime  # noqa: E402

from medusa_export.runtime.decode import GenerationConfig  # noqa: E402
from medusa_export.runtime.serve.metrics import ServerMetrics  # noqa: E402
from medusa_export.runtime.serve.requests import ApiError, Job  # noqa: E402
from medusa_export.runtime.serve.scheduler import Finished, Scheduler  # noqa: E402


@pytest.fixture(scope="module")
def runtime(tiny_dirs, tmp_path_factory):
    rt = load_runtime(build_chat_artifact(tiny_dirs, tmp_path_factory.mktemp("drain")))
    yield rt
    rt.close()


def _job(runtime, tokens: int) -> Job:
    ids = runtime.generator.tokenizer.encode(PROMPT)
    return Job(ids, GenerationConfig(max_new_tokens=tokens, ignore_eos=True, medusa=False), False, False, False)


async def _finished(request) -> Finished:
    async for item in request.events():
        if isinstance(item, Finished):
            return item
    raise AssertionError("no Finished event")


def test_a_drain_past_its_deadline_ends_running_and_queued_requests_with_shutdown(runtime):
    async def main():
        sched = Scheduler(runtime.generator, 1, 64, 2, 300.0, ServerMetrics("m"))
        try:
            running, queued = sched.submit(_job(runtime, LONG)), sched.submit(_job(runtime, LONG))
            clean = await sched.drain(0.0)
            ends = [await _finished(r) for r in (running, queued)]
            with pytest.raises(ApiError) as refused:
                sched.submit(_job(runtime, 4))
            return sched, clean, ends, refused.value, await sched.drain(30.0)
        finally:
            sched.stop()

    sched, clean, ends, refused, again = asyncio.run(main())
    assert clean is False and again is False and sched.drained is False  # a second call returns the first's outcome
    assert [e.reason for e in ends] == ["shutdown", "shutdown"]
    assert ends[0].result.finish_reason == "shutdown" and ends[0].result.new_tokens < LONG
    assert sched.admitted == 0 and not sched.live
    assert refused.status == 503 and refused.headers.get("Retry-After") == "1"


def test_a_drain_that_finds_its_requests_ending_in_time_is_clean(runtime):
    async def main():
        sched = Scheduler(runtime.generator, 1, 64, 2, 300.0, ServerMetrics("m"))
        try:
            request = sched.submit(_job(runtime, 6))
            clean = await sched.drain(60.0)
            return sched, clean, await _finished(request)
        finally:
            sched.stop()

    sched, clean, end = asyncio.run(main())
    assert clean is True and end.reason is None and end.result.finish_reason == "length"
    assert sched.admitted == 0 and not sched.live


def test_abandoning_a_drain_stops_waiting_at_once(runtime):
    """A second Ctrl-C (`abandon`): the drain returns without waiting out its deadline."""
    async def main():
        sched = Scheduler(runtime.generator, 1, 64, 2, 300.0, ServerMetrics("m"))
        try:
            request = sched.submit(_job(runtime, LONG))
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            clean = await sched.drain(120.0, abandon=lambda: True)
            waited = loop.time() - t0
            request.cancel()
            await _finished(request)
            return clean, waited
        finally:
            sched.stop()

    clean, waited = asyncio.run(main())
    assert clean is False and waited < 60
