"""Slow clients against `medusa-export serve` on 127.0.0.1: connections that stall before or inside a request,
and requests whose chat template runs long. Each is cut off in bounded time while other requests are answered."""

from __future__ import annotations

import json
import socket
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_helpers import KEY, PROMPT, build_chat_artifact, post, serving  # noqa: E402


@pytest.fixture(scope="module")
def artifact(tiny_dirs, tmp_path_factory):
    return build_chat_artifact(tiny_dirs, tmp_path_factory.mktemp("slow"))


# ------------------------------------------------------------------------------------------- slow clients


def _open(base: str, data: bytes) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=20)
    sock.sendall(data)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_clients_that_stall_mid_request_are_cut_off(artifact):
    """A connection that sends nothing, part of its headers, or part of its body is not held open without end: the
    first two are closed after --header-timeout, the third answered 408 after --request-timeout; the server
    answers normally meanwhile and after."""
    with serving(artifact, "--threads", "1", "--api-key", KEY, "--header-timeout", "1", "--request-timeout", "2") \
            as (base, _):
        silent = _open(base, b"")
        partial_headers = _open(base, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n")
        partial_body = _open(base, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                                   b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n"
                                   b'{"prompt"')
        t0 = time.monotonic()
        code, body, _ = post(base + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
        assert code == 200
        assert _read_until_closed(silent) == b"" and _read_until_closed(partial_headers) == b""
        answer = _read_until_closed(partial_body)
        assert time.monotonic() - t0 < 15
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 2 s" in answer, answer[:300]
        # Answered before its body was read (a wrong key: 401), then trickling that body: closed all the same.
        trickle = _open(base, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer wrong\r\n"
                              b"Content-Length: 1000000000\r\n\r\n{")
        trickle.settimeout(0.3)
        received, closed = b"", False
        for _ in range(40):  # 12 s at most
            try:
                trickle.sendall(b" ")
                chunk = trickle.recv(65536)
                received += chunk
                closed = chunk == b""
            except socket.timeout:
                continue
            except OSError:  # reset by the server's close
                closed = True
            if closed:
                break
        assert received.startswith(b"HTTP/1.1 401") and closed, received[:200]
        code, body, _ = post(base + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
        assert code == 200


# ------------------------------------------------------------------------------------------- slow chat templates


def test_slow_template_renders_delay_no_one_for_long(artifact, tmp_path):
    """A template that runs past its 2 s on some messages: those requests get a 400 (or a 503 when every template
    worker is held), other chat requests wait at most a few seconds, and completions, which render no template,
    are answered at once. (Before, one worker behind one lock queued every chat request, and with the threads
    they held, completions too, for minutes.)"""
    import hashlib
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    from conftest import CHATML

    art = shutil.copytree(artifact, tmp_path / "slow")
    config = json.loads((art / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% if messages[0]['content'] == 'SLOW' %}{% for i in range(100000) %}"
                               "{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}" + CHATML)
    (art / "tokenizer_config.json").write_text(json.dumps(config))
    manifest = json.loads((art / "manifest.json").read_text())
    data = (art / "tokenizer_config.json").read_bytes()
    manifest["files"]["tokenizer_config.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (art / "manifest.json").write_text(json.dumps(manifest))
    slow = {"messages": [{"role": "user", "content": "SLOW"}], "max_tokens": 2}
    with serving(art, "--threads", "1", "--api-key", KEY) as (base, _), ThreadPoolExecutor(12) as pool:
        hostile = [pool.submit(post, base + "/v1/chat/completions", slow) for _ in range(10)]
        time.sleep(1)
        t0 = time.monotonic()
        code, _, _ = post(base + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
        assert code == 200 and time.monotonic() - t0 < 5
        t0 = time.monotonic()
        code, body, headers = post(base + "/v1/chat/completions",
                                   {"messages": [{"role": "user", "content": "t5"}], "max_tokens": 2, "temperature": 0})
        assert (code == 200 or code == 503 and headers.get("Retry-After")) and time.monotonic() - t0 < 15, body
        answers = [f.result(timeout=120) for f in hostile]
        assert {c for c, _, _ in answers} <= {400, 503}
        assert any("ran for more than" in b["error"]["message"] for c, b, _ in answers if c == 400)


def _flooded(base: str) -> tuple[socket.socket, int]:
    """A connection with a small receive buffer that has sent pipelined requests until the server stopped reading
    them (their answers fill the buffers), and how many it sent; non-blocking."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.setblocking(False)
    request, sent = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n", 0
    try:
        for _ in range(20000):  # bounded
            sock.send(request)
            sent += 1
    except (BlockingIOError, ConnectionError):
        pass
    return sock, sent


def test_a_client_that_stops_reading_is_cut_off(artifact):
    """Pipelined requests whose answers the client never reads fill the server's send buffer; uvicorn would wait
    for it to drain without end. After --header-timeout of no progress the connection is dropped (fewer answers
    than requests arrive), and the server answers others meanwhile."""
    with serving(artifact, "--threads", "1", "--header-timeout", "1") as (base, _):
        sock, sent = _flooded(base)
        assert post(base + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "temperature": 0}, key=None)[0] == 200
        time.sleep(4)  # the deadline passes with nothing read
        sock.settimeout(5)
        received, ended, deadline = b"", False, time.monotonic() + 30
        try:
            while time.monotonic() < deadline:  # what was in flight, then the reset or the end (bounded)
                chunk = sock.recv(1 << 16)
                if not chunk:
                    ended = True
                    break
                received += chunk
        except ConnectionError:
            ended = True
        except socket.timeout:
            pass
        finally:
            sock.close()
        answers = received.count(b"HTTP/1.1 200")
        assert ended and 0 < answers < sent, (ended, answers, sent)


def test_a_slow_reader_that_keeps_reading_keeps_its_connection(artifact):
    """The write deadline cuts a client off only for a whole --header-timeout with nothing read: one reading slower
    than the server writes, but reading, keeps its connection past several deadlines."""
    with serving(artifact, "--threads", "1", "--header-timeout", "1") as (base, _):
        sock, _sent = _flooded(base)
        sock.setblocking(True)
        sock.settimeout(5)
        received, t0 = 0, time.monotonic()
        try:
            while time.monotonic() - t0 < 4:  # four deadlines, reading a little every 50 ms
                chunk = sock.recv(1024)
                assert chunk, "the server closed a connection that was being read"
                received += len(chunk)
                time.sleep(0.05)
        finally:
            sock.close()
        assert received > 0
