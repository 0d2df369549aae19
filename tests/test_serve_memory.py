"""A long-running server keeps nothing of a request once it has ended: after a mix of requests (completions and chat,
greedy and sampled, streamed and not, streams whose client went away mid-answer, bad requests), every scheduler
and engine structure is back to its size before them, and each request's objects (the scheduler's `Request`, the
engine's `Sequence`) are freed. What resident memory does under load, and why it levels off, is measured by
`scripts/serve_memory.py` (docs/serving.md, "Memory under load"). In-process, through the ASGI app."""

from __future__ import annotations

import asyncio
import gc
import json
import weakref

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from serve_helpers import PROMPT, build_chat_artifact, load_runtime  # noqa: E402

from medusa_export.runtime.serve import app as app_module  # noqa: E402
from medusa_export.runtime.serve.scheduler import Scheduler  # noqa: E402

IDLE_WAIT_S = 60.0  # bound on the wait for the engine to hand back the requests whose clients left


@pytest.fixture(scope="module")
def runtime(tiny_dirs, tmp_path_factory):
    rt = load_runtime(build_chat_artifact(tiny_dirs, tmp_path_factory.mktemp("memory")))
    yield rt
    rt.close()


def _scope(path: str, body: bytes) -> dict:
    return {"type": "http", "http_version": "1.1", "method": "POST", "path": path, "raw_path": path.encode(),
            "root_path": "", "scheme": "http", "query_string": b"", "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 8000), "headers": [(b"host", b"localhost"), (b"content-type", b"application/json"),
                                                       (b"content-length", str(len(body)).encode())]}


async def _call(app, path: str, body: dict, leave_after_first_chunk: bool = False) -> int:
    """The response's status; ``leave_after_first_chunk``: the client disconnects once the first body chunk came."""
    data, sent, delivered = json.dumps(body).encode(), [], False
    gone = asyncio.Event()

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": data, "more_body": False}
        await gone.wait()  # the client stays until it leaves (never, unless asked to)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if leave_after_first_chunk and message["type"] == "http.response.body" and message.get("body"):
            gone.set()

    await app(_scope(path, data), receive, send)
    return sent[0]["status"]


def _mix() -> list[tuple[str, dict, bool]]:
    """(route, body, disconnect mid-stream) for each request of the mix."""
    chat = [{"role": "user", "content": PROMPT}]
    return [
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}, False),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0.8, "seed": 1}, False),
        ("/v1/chat/completions", {"messages": chat, "max_tokens": 5, "temperature": 0, "stream": True,
                                  "stream_options": {"include_usage": True}}, False),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0.5, "stream": True, "seed": 2}, False),
        ("/v1/chat/completions", {"messages": chat, "max_tokens": 400, "temperature": 0, "stream": True,
                                  "ignore_eos": True}, True),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 400, "stream": True, "ignore_eos": True}, True),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "medusa": False, "temperature": 0}, False),
        ("/v1/completions", {"prompt": PROMPT, "n": 0}, False),  # 400 before admission
        ("/v1/chat/completions", {"messages": chat, "temperature": 5}, False),  # 400
    ]


def _sizes(sched: Scheduler) -> tuple:
    """What the scheduler and its engine hold of requests: all back to this after the requests end."""
    engine = sched.engine
    return len(sched.live), sched.admitted, len(engine.running), len(engine.waiting), sorted(engine.free)


async def _settled(busy, refs: list[weakref.ref]) -> list:
    """The objects of ``refs`` still alive once the server is idle: the requests whose clients left end at the
    engine's next step, and the engine thread may still be inside the step that ended the last one (its locals hold
    that step's sequences). Bounded: a request kept for good is still there after IDLE_WAIT_S."""
    alive: list = []
    for _ in range(int(IDLE_WAIT_S / 0.05)):
        await asyncio.sleep(0.05)  # the engine thread's deliveries (call_soon_threadsafe) run on this loop meanwhile
        if busy():
            continue
        gc.collect()
        alive = [ref() for ref in refs if ref() is not None]
        if not alive:
            break
    return alive


def test_finished_requests_leave_nothing_behind(runtime, monkeypatch):
    app = app_module.create_app(runtime, app_module.ServeSettings(max_num_seqs=3, max_queue=16))
    sched = app.state.scheduler
    engine = sched.engine
    submitted: list[weakref.ref] = []
    submit_all = Scheduler.submit_all

    def tracked(self, jobs, **kw):
        requests = submit_all(self, jobs, **kw)
        for request, job in zip(requests, jobs):
            submitted.extend((weakref.ref(request), weakref.ref(request.sequence), weakref.ref(job)))
        return requests

    monkeypatch.setattr(Scheduler, "submit_all", tracked)
    baseline = _sizes(sched)

    async def scenario() -> tuple[list[int], list, tuple]:
        statuses = []
        for _ in range(2):  # twice: nothing of the first round may outlive it either
            statuses += await asyncio.gather(*(_call(app, path, body, leave) for path, body, leave in _mix()))
        alive = await _settled(lambda: sched.admitted or engine.running or engine.waiting, submitted)
        return statuses, alive, _sizes(sched)

    try:
        statuses, alive, after = asyncio.run(scenario())
    finally:
        sched.stop()
    assert statuses.count(200) == 14 and statuses.count(400) == 4, statuses
    assert len(submitted) == 3 * 14  # every admitted request was tracked
    assert not alive, [type(o).__name__ for o in alive]  # freed while the server still runs
    assert after == baseline
