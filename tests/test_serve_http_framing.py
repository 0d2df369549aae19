"""HTTP framing on a real uvicorn on 127.0.0.1 (`medusa-export serve`): an answer sent before a request's body was
read closes the connection (a client that sent `Expect: 100-continue` may skip the body), one sent after keeps it,
HEAD is answered wherever GET is, and an ``Upgrade`` header is ignored without a word in the log."""

from __future__ import annotations

import http.client
import socket
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from serve_helpers import KEY, assert_still_serving, build_chat_artifact, serving  # noqa: E402


@pytest.fixture(scope="module")
def artifact(tiny_dirs, tmp_path_factory):
    return build_chat_artifact(tiny_dirs, tmp_path_factory.mktemp("framing"))


@pytest.fixture(scope="module")
def server(artifact):
    with serving(artifact, "--threads", "1", "--api-key", KEY) as (base, _):
        yield base


@pytest.fixture(autouse=True)
def still_serving(server):
    """After every test here the server answers a normal request."""
    yield
    assert_still_serving(server)


def _raw_exchange(server: str, request: bytes) -> bytes:
    """Send ``request`` on a fresh connection and read until the server closes it (or 10 s pass)."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        data = b""
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline:
                part = s.recv(65536)
                if not part:
                    return data
                data += part
        except socket.timeout:
            pass
        return data + b"<still open>"


@pytest.mark.parametrize("refusal, status", [(b"", 401), (b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                                                            b"Content-Type: text/plain\r\n", 415)])
def test_an_answer_before_the_body_is_read_closes_the_connection(server, refusal, status):
    """A client that sent ``Expect: 100-continue`` and got a final answer may skip its body: the connection is
    closed (and says so), so the client's next request is never read as that body."""
    port = server.rsplit(":", 1)[1]
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:" + port.encode() + b"\r\nExpect: 100-continue\r\n"
            + refusal + b"Content-Length: 60\r\n\r\n")
    data = _raw_exchange(server, head)
    assert data.startswith(b"HTTP/1.1 %d " % status), data[:200]
    assert b"\r\nconnection: close\r\n" in data.lower() and not data.endswith(b"<still open>")


def test_an_answer_after_the_body_was_read_keeps_the_connection(server):
    """Only answers sent before the body was read close: a 400 for a body read whole leaves the connection open."""
    port = server.rsplit(":", 1)[1]
    body = b'{"prompt": 5}'
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:" + port.encode() + b"\r\nAuthorization: Bearer "
               + KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    host, port_number = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port_number)), timeout=30) as s:
        s.sendall(request + b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # pipelined after the 400
        data = b""
        while data.count(b"HTTP/1.1 ") < 2 or not data.endswith(b"}"):
            part = s.recv(65536)
            assert part, data
            data += part
    assert data.startswith(b"HTTP/1.1 400 ") and b"HTTP/1.1 200 " in data and b"connection: close" not in data.lower()


@pytest.mark.parametrize("path", ["/metrics", "/v1/models", "/health"])
def test_head_is_answered_wherever_get_is(server, path):
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("HEAD", path, headers={"Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b""
    conn.close()


def test_upgrade_requests_are_answered_as_http_and_leave_the_log_quiet(artifact):
    """uvicorn logged two warnings for every request with ``Connection: Upgrade`` (h2c, websocket), one advising to
    install a WebSocket library: any client could fill the log of a server that is otherwise quiet per request."""
    with serving(artifact, "--threads", "1") as (base, proc):
        host, port = base.removeprefix("http://").split(":")
        for upgrade in (b"h2c", b"websocket"):
            request = (b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:" + port.encode() + b"\r\nConnection: Upgrade, close"
                       b"\r\nUpgrade: " + upgrade + b"\r\nSec-WebSocket-Version: 13\r\n"
                       b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
            data = _raw_exchange(base, request)
            assert data.startswith(b"HTTP/1.1 200 ") and b'"object":"list"' in data, data[:200]
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
    assert "upgrade" not in log.lower() and "WebSocket" not in log, log
