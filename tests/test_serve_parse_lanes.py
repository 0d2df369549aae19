"""Requests parse on threads of their own by kind and size (`serve/app.py`, PARSE_THREADS): a flood of bodies near the
size limit, each of which tokenizes for a second or more, takes two threads and never delays a small request. Before,
completions parsed on anyio's shared pool of 40 threads, and 40 such bodies made a small completion wait for them
(28-34 s in an attack on the default model, past the request timeout). In-process, through the ASGI app, with the
parse of large bodies made slow."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from serve_helpers import PROMPT, build_chat_artifact, load_runtime  # noqa: E402

from medusa_export.runtime.serve import app as app_module  # noqa: E402

SLOW_S = 3.0
FLOOD = 45  # more than anyio's default pool


@pytest.fixture(scope="module")
def runtime(tiny_dirs, tmp_path_factory):
    rt = load_runtime(build_chat_artifact(tiny_dirs, tmp_path_factory.mktemp("lanes")))
    yield rt
    rt.close()


async def _post(app, path: str, body: bytes) -> tuple[int, dict]:
    scope = {"type": "http", "http_version": "1.1", "method": "POST", "path": path, "raw_path": path.encode(),
             "root_path": "", "scheme": "http", "query_string": b"", "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 8000), "headers": [(b"host", b"localhost"), (b"content-type", b"application/json"),
                                                        (b"content-length", str(len(body)).encode())]}
    sent, delivered = [], False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # no disconnect while the answer is made

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def test_a_flood_of_large_bodies_never_delays_a_small_request(runtime, monkeypatch):
    parse = app_module.parse_completions
    running, most = [0], [0]
    lock = threading.Lock()

    def slow_for_large(body, model):
        if len(body.get("prompt", "")) > app_module.SMALL_BODY_BYTES:
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(SLOW_S)  # what tokenizing a prompt near the size limit costs
            with lock:
                running[0] -= 1
        return parse(body, model)

    monkeypatch.setattr(app_module, "parse_completions", slow_for_large)
    app = app_module.create_app(runtime, app_module.ServeSettings(timeout_s=4.0))
    large = json.dumps({"prompt": "t5 " * (app_module.SMALL_BODY_BYTES // 3 + 100), "max_tokens": 1}).encode()
    small = json.dumps({"prompt": PROMPT, "max_tokens": 2, "temperature": 0}).encode()

    async def scenario():
        flood = [asyncio.create_task(_post(app, "/v1/completions", large)) for _ in range(FLOOD)]
        await asyncio.sleep(0.5)  # the flood holds whatever threads it can get
        t0 = time.monotonic()
        status, body = await _post(app, "/v1/completions", small)
        waited = time.monotonic() - t0
        return status, body, waited, await asyncio.gather(*flood)

    status, body, waited, flood = asyncio.run(scenario())
    assert status == 200 and body["usage"]["completion_tokens"] >= 1
    assert waited < 1.0, waited  # it never waited for a large parse to end (one lane would: SLOW_S - 0.5)
    assert most[0] <= app_module.PARSE_THREADS[True]  # large parses: two at a time, whatever arrives
    statuses = {s for s, _ in flood}
    assert statuses <= {400, 503} and 503 in statuses  # past the timeout in their lane: retry later, not a 500
    retry = next(b for s, b in flood if s == 503)
    assert "the prompt was not tokenized within 4 s" in retry["error"]["message"]
    app.state.scheduler.stop()
