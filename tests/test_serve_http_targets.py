"""Request targets and connection ends that uvicorn alone got wrong, on a real uvicorn on 127.0.0.1 (`medusa-export
serve`) and in-process: absolute-form targets (RFC 9112 3.2.2) answered under the DNS-rebinding guard, requests h11
cannot parse answered with an OpenAI-style error that reaches the client, and clients that half-close their socket
after a whole request answered. After each, the server still answers."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from serve_helpers import KEY, PROMPT, assert_still_serving, build_chat_artifact, serving  # noqa: E402

from medusa_export.runtime.serve.host_check import HostCheck, origin_form, same_authority  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_dirs, tmp_path_factory):
    artifact = build_chat_artifact(tiny_dirs, tmp_path_factory.mktemp("targets"))
    with serving(artifact, "--max-num-seqs", "2", "--max-queue", "2", "--threads", "1", "--api-key", KEY) as (base, _):
        yield base


def _exchange(server: str, request: bytes, half_close: bool = False, seconds: float = 20) -> bytes:
    """Send ``request`` on a fresh connection (then shut the sending side, if asked) and read until the server
    closes it (bounded)."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=seconds) as s:
        s.sendall(request)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        data, deadline = b"", time.monotonic() + seconds
        while time.monotonic() < deadline:
            part = s.recv(65536)
            if not part:
                return data
            data += part
    return data + b"<still open>"


def _final(answer: bytes) -> bytes:
    """The final response of ``answer``, after a ``100 Continue`` sent before it (if any)."""
    return answer.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")


def _error(answer: bytes) -> dict:
    return json.loads(answer.partition(b"\r\n\r\n")[2])["error"]


# ------------------------------------------------------------------------------------------- in-process


@pytest.mark.parametrize("target, want", [
    (b"/v1/models", (b"/v1/models", None)),
    (b"http://127.0.0.1:8000/v1/models", (b"/v1/models", "127.0.0.1:8000")),
    (b"HTTPS://LocalHost/v1/models/m%65", (b"/v1/models/m%65", "LocalHost")),
    (b"http://[::1]:80", (b"/", "[::1]:80")),  # an empty path is "/"
])
def test_absolute_targets_are_read_as_their_path_and_authority(target, want):
    assert origin_form(target) == want


@pytest.mark.parametrize("target", [b"*", b"v1/models", b"ftp://127.0.0.1/v1/models", b"http:///v1/models",
                                    b"http://user@127.0.0.1/v1/models", b"http://127.0.0.1#frag", b"http//x/"])
def test_other_targets_are_refused(target):
    with pytest.raises(ValueError, match="neither a path"):
        origin_form(target)


def test_authorities_compare_by_name_and_port():
    assert same_authority("LOCALHOST.:8000", "localhost:8000") and same_authority("[::1]:80", "[::1]:80")
    assert not same_authority("localhost:8000", "localhost:8001")
    assert not same_authority("localhost", "localhost:80")  # a default port this check cannot know
    assert not same_authority("127.0.0.1", "attacker.example")


def _call(target: bytes, host: bytes | None) -> tuple[int, bytes, list]:
    """One GET through the guard (loopback names only) in-process: (status, body, (path, Host) the app saw)."""
    seen: list = []

    async def inner(scope, receive, send):
        seen.append((scope["path"], dict(scope["headers"]).get(b"host")))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    scope = {"type": "http", "http_version": "1.1", "method": "GET", "path": target.decode(), "raw_path": target,
             "root_path": "", "scheme": "http", "query_string": b"", "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 8000), "headers": [] if host is None else [(b"host", host)]}
    sent: list = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(HostCheck(inner, ())(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), seen


def test_the_guard_routes_an_absolute_target_by_its_path_and_checks_its_authority():
    assert _call(b"http://127.0.0.1:8000/v1/m%6Fdels", b"127.0.0.1:8000") == (200, b"ok",
                                                                                   [("/v1/models", b"127.0.0.1:8000")])
    # an HTTP/1.0 request without Host: the authority is its Host (the Origin check compares with it)
    assert _call(b"http://localhost:8000/v1/models", None)[2] == [("/v1/models", b"localhost:8000")]
    for target, host in ((b"http://attacker.example/v1/models", b"attacker.example"),  # a rebound name
                         (b"http://attacker.example/v1/models", b"127.0.0.1"),  # the target's name is judged too
                         (b"http://127.0.0.1/v1/models", b"attacker.example")):  # they disagree
        status, body, seen = _call(target, host)
        assert status == 400 and json.loads(body)["error"]["code"] == "invalid_host" and seen == []
    assert _call(b"http://attacker.example/health", b"attacker.example")[0] == 200  # probes stay open


# ------------------------------------------------------------------------------------------- on the wire


def test_absolute_form_targets_are_answered_and_guarded(server):
    """`GET http://127.0.0.1:PORT/v1/models` got a 404 ("no route '/http://...'"): RFC 9112 3.2.2 says servers
    must accept it. Its authority passes the same Host check, and must agree with the Host header."""
    port = server.rsplit(":", 1)[1].encode()
    auth = b"Authorization: Bearer " + KEY.encode() + b"\r\n"

    def ask(target: bytes, host: bytes) -> bytes:
        return _exchange(server, b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + auth
                         + b"Connection: close\r\n\r\n")

    ok = ask(b"http://127.0.0.1:" + port + b"/v1/models?x=1", b"127.0.0.1:" + port)
    assert ok.startswith(b"HTTP/1.1 200 ") and b'"object":"list"' in ok, ok[:300]
    assert b'"id":"' in ask(b"HTTP://LOCALHOST:" + port + b"/v1/models/%6dodel", b"localhost:" + port)
    for target, host in ((b"http://attacker.example:" + port + b"/v1/models", b"attacker.example:" + port),
                         (b"http://127.0.0.1:" + port + b"/v1/models", b"attacker.example:" + port),
                         (b"http://attacker.example:" + port + b"/v1/models", b"127.0.0.1:" + port)):
        answer = ask(target, host)
        assert answer.startswith(b"HTTP/1.1 400 ") and _error(answer)["code"] == "invalid_host", answer[:300]
    answer = ask(b"*", b"127.0.0.1")
    assert answer.startswith(b"HTTP/1.1 400 ") and _error(answer)["code"] == "invalid_request_target"
    assert_still_serving(server)


@pytest.mark.parametrize("request_bytes, status, words", [
    (b"GARBAGE\r\n\r\n", 400, "illegal request line"),
    (b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: attacker.example\r\n\r\n", 400, "multiple Host"),
    (b"GET /v1/models HTTP/1.1\r\n\r\n", 400, "Host"),
    (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n", 400, "Content-Length"),
    (b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Pad: 0123456789\r\n" * 20_000 + b"\r\n", 431, "headers"),
    # 20 kB, past h11's 16 KiB, arriving in one read of the socket: h11 checks its limit only on an incomplete block,
    # so this one was answered (200)
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + b"X-Pad: 0123456789\r\n" * 1_000
     + b"\r\n", 431, "headers"),
    # Counted as sent: 20 kB of a header's surrounding whitespace (h11 strips it), and a block one byte past 16 KiB
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Pad: a" + b" " * 20_000 + b"\r\n\r\n", 431,
     "headers"),
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Pad: " + b"a" * (16_385 - 69) + b"\r\n\r\n",
     431, "headers"),    # Request smuggling: a body framed by both lengths, the rest of it a request a proxy in front would not have
    # seen (it read 5 bytes of body); with the connection kept, it was answered as a second request
    (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\nGET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400, "Transfer-Encoding with Content-Length"),
    (b"POST /v1/completions HTTP/1.0\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400,
     "on HTTP/1.0"),
])
def test_requests_h11_cannot_parse_get_an_openai_error_that_arrives(server, request_bytes, status, words):
    """uvicorn answered them with a plain-text "Invalid HTTP request received." (no cause), and for 400 kB of
    headers closed with most of them unread: the socket sent a reset, and the client lost even that answer."""
    answer = _exchange(server, request_bytes)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    error = _error(answer)  # all that follows the headers is this one body: a second answer would not parse
    assert error["code"] == "invalid_http_request" and words in error["message"] and "\n" not in error["message"]
    assert b"\r\nx-served-by: " in answer.partition(b"\r\n\r\n")[0].lower()
    assert_still_serving(server)


def _post(body: dict, version: bytes = b"1.1") -> bytes:
    raw = json.dumps(body).encode()
    return (b"POST /v1/completions HTTP/" + version + b"\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(raw) + raw)


def test_a_client_that_half_closes_after_its_request_gets_its_answer(server):
    """A client that sent a whole request, then shut its sending side (``nc -N``), got nothing: uvicorn closed
    the connection at the end of its input. TCP tells a half-close from a close only once something is written
    (a closed client answers with a reset), so a request not yet answered is sent a ``100 Continue`` first; an
    HTTP/1.0 client may not be sent one, and gets a 400 that says why."""
    models = _exchange(server, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode()
                       + b"\r\n\r\n", half_close=True)
    assert _final(models).startswith(b"HTTP/1.1 200 ") and b'"object":"list"' in models, models[:200]
    stream = _exchange(server, _post({"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}),
                       half_close=True)
    assert _final(stream).startswith(b"HTTP/1.1 200 ") and b"data: [DONE]" in stream, stream[:200]
    plain = _exchange(server, _post({"prompt": PROMPT, "max_tokens": 300, "ignore_eos": True}), half_close=True)
    head, _, body = plain.partition(b"\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert head == b"HTTP/1.1 100 Continue" and json.loads(body.partition(b"\r\n\r\n")[2])["usage"][
        "completion_tokens"] == 300, plain[:300]
    old = _exchange(server, _post({"prompt": PROMPT, "max_tokens": 300, "ignore_eos": True}, b"1.0"), half_close=True)
    assert old.startswith(b"HTTP/1.1 400 ") and _error(old)["code"] == "client_half_closed", old[:300]
    assert_still_serving(server)


def test_a_client_that_closes_before_its_answer_still_stops_its_decoding(server):
    """The half-close support must not keep decoding for a client gone (a close reads as the same end of input):
    the ``100 Continue`` draws its reset, and its request ends as aborted, long before its 1,500 tokens."""
    from serve_helpers import metric, wait_idle

    aborted = metric(server, "request_success_total", 'finished_reason="abort"')
    generated = metric(server, "generation_tokens_total")
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(_post({"prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True, "medusa": False}))
        deadline = time.monotonic() + 30
        while metric(server, "num_requests_running") == 0 and time.monotonic() < deadline:  # bounded
            time.sleep(0.02)
    wait_idle(server, seconds=10)
    assert metric(server, "request_success_total", 'finished_reason="abort"') == aborted + 1
    assert metric(server, "generation_tokens_total") - generated < 1500
    assert_still_serving(server)
