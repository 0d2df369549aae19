"""The server's log, metrics and response headers against request text built to forge or break them, on a real
uvicorn on 127.0.0.1 (`medusa-export serve`): newlines, carriage returns, terminal escapes (clear screen, OSC 8
links), NUL and U+2028 in every field, header and target a client controls. None of it may reach the log, become
a Prometheus label value or a response header, or cut a server-sent event short."""

from __future__ import annotations

import json
import re
import socket

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
prometheus_client = pytest.importorskip("prometheus_client")

from serve_helpers import KEY, PROMPT, build_chat_artifact, free_port, get, load_runtime, post, serving  # noqa: E402

EVIL = "x\r\nINFO:     forged 200 OK\n\x1b[2J\x1b]8;;http://evil.example\x1b\\link\x1b]8;;\x1b\\\x00\u2028\u0085end"
MARKERS = ("forged", "evil.example", "\x1b", "\x00", "\u2028")  # what none of the server's own text holds
NAME = "served-model"
FINISHES = {"stop", "length", "abort", "timeout", "shutdown", "error"}  # every finish reason the server records


@pytest.fixture(scope="module")
def artifact(tiny_dirs, tmp_path_factory):
    return build_chat_artifact(tiny_dirs, tmp_path_factory.mktemp("observability"))


def raw(port: int, data: bytes, seconds: float = 10) -> bytes:
    """Send ``data`` on a connection of its own; everything the server answers until it closes (bounded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as s:
        s.sendall(data)
        out = b""
        for _ in range(1000):  # bounded
            try:
                part = s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not part:
                break
            out += part
    return out


def hostile_raw_requests() -> list[bytes]:
    """Requests whose target, headers or request line carry text made to forge log lines or response headers."""
    evil = EVIL.encode("utf-8").replace(b"\r", b"%0d").replace(b"\n", b"%0a")
    header_safe = EVIL.encode("utf-8").replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"")
    auth = b"Authorization: Bearer " + KEY.encode() + b"\r\n"
    close = b"Connection: close\r\n"
    pct = b"/%0d%0aINFO:%20%20%20%20%20forged%20200%20OK%1b[2J%00%E2%80%A8"
    return [
        b"GET " + pct + b"?q=" + pct[1:] + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + close + b"\r\n",
        b"GET /v1/models/" + pct[1:] + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth + close + b"\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: " + header_safe + b"\r\n" + auth + close + b"\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + header_safe + b"\r\n" + close + b"\r\n",
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Forwarded-For: " + header_safe + b"\r\nUser-Agent: " +
        header_safe + b"\r\nX-Request-Id: " + header_safe + b"\r\n" + close + b"\r\n",
        b"GET /" + evil + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # not valid HTTP: h11 refuses the request line
        b"G\x1b[2JET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nBad\x1b[2J: header\r\n\r\n",
        b"DELETE /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: " + header_safe + b"\r\n" + close + b"\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth + b"Content-Type: " + header_safe +
        b"\r\nContent-Length: 2\r\n" + close + b"\r\n{}",
    ]


def hostile_bodies() -> list[dict]:
    """Completion and chat bodies with the forging text in each field a client fills."""
    base = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    return [{**base, "model": EVIL}, {**base, "user": EVIL}, {**base, "prompt": EVIL}, {**base, "stop": [EVIL]},
            {**base, EVIL: 1}, {**base, "max_tokens": EVIL}, {**base, "model": "m" * 200_000},
            {**base, "logit_bias": {EVIL: 1}}, {**base, "stop": EVIL, "user": EVIL, "suffix": EVIL}]


def send_hostile_traffic(base: str, port: int, rounds: int = 3) -> list[bytes]:
    """Every hostile request ``rounds`` times (a few dozen in all); the raw answers."""
    answers = []
    for _ in range(rounds):  # bounded
        answers += [raw(port, data) for data in hostile_raw_requests()]
        for body in hostile_bodies():
            code, _, _ = post(base + "/v1/completions", body)
            assert code < 500
        code, _, _ = post(base + "/v1/chat/completions", {"messages": [{"role": "user", "content": EVIL, EVIL: 1}],
                                                          "model": EVIL, "max_tokens": 2})
        assert code < 500
    return answers


def series(base: str) -> set[tuple[str, tuple]]:
    """Every (sample name, labels) the exposition holds, parsed as Prometheus reads it."""
    from prometheus_client.parser import text_string_to_metric_families

    text = get(base + "/metrics")[1].decode()
    return {(s.name, tuple(sorted(s.labels.items()))) for f in text_string_to_metric_families(text) for s in f.samples}


def test_request_text_never_reaches_the_log_headers_or_labels(artifact):
    """Dozens of hostile requests: the log holds the start line and nothing a client wrote (no forged record, no
    escape, not a line per malformed request); no answer's header block holds request text; the metrics keep the
    series they had, with the served name and the server's finish reasons as their only label values."""
    with serving(artifact, "--threads", "1", "--api-key", KEY, "--served-model-name", NAME) as (base, proc):
        port = int(base.rsplit(":", 1)[1])
        post(base + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "temperature": 0})  # every series once
        before = series(base)
        answers = send_hostile_traffic(base, port)
        after = series(base)
    log = proc.stdout.read()
    assert not [m for m in MARKERS if m in log], log[-2000:]
    assert "Invalid HTTP request" not in log, log[-2000:]  # one line per malformed request, for any client
    assert len(log.splitlines()) <= 4 and len(log) < 4000, log[-2000:]
    for answer in answers:
        head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        assert answer.startswith(b"HTTP/1.1 4") or answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert not [m for m in MARKERS if m in head], head
        assert head.count("HTTP/1.1") == 1  # one status line: the answer was not split
    assert all(name.startswith("medusa_export:") for name, _ in after)  # no metric named by request text
    assert len(after) < 2 * len(before) + 100  # a few dozen distinct hostile values made no series of their own
    labels = {(k, v) for _, ls in after for k, v in ls if k not in ("le", "position")}
    assert {v for k, v in labels if k == "model_name"} == {NAME}
    assert {v for k, v in labels if k == "finished_reason"} <= FINISHES
    assert {v for k, v in labels if k == "reason"} <= {"queue_full", "shutdown"}


def test_stream_events_stay_whole_with_line_breaks_in_the_request(artifact):
    """A stream asked with line breaks in its stop string, user and prompt: every event is one ``data:`` line of
    JSON (or [DONE]) and each chunk names the served model."""
    with serving(artifact, "--threads", "1", "--served-model-name", NAME) as (base, _):
        body = json.dumps({"prompt": PROMPT + " " + EVIL, "max_tokens": 4, "temperature": 0, "stream": True,
                           "stop": ["\n\ndata: forged", EVIL], "user": EVIL}).encode()
        port = int(base.rsplit(":", 1)[1])
        answer = raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body, seconds=60)
    head, _, stream = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head, head
    text = b"".join(stream.split(b"\r\n")[1::2]).decode()  # the chunked body's data, without its size lines
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and len(events) >= 2
    for event in events[:-1]:
        assert event.startswith("data: ") and len(event.splitlines()) == 1, event
        assert json.loads(event[6:])["model"] == NAME


def test_uvicorns_access_log_is_off_and_malformed_requests_are_not_logged():
    """uvicorn's access log (the percent-decoded path of every request) stays off, and its warning for a request
    h11 cannot parse is dropped."""
    import logging

    from medusa_export.runtime.serve.http_deadlines import INVALID_REQUEST, QUIET_INVALID_REQUESTS
    from medusa_export.runtime.serve.server import uvicorn_config

    config = uvicorn_config(lambda *a: None, "127.0.0.1", free_port(), 30.0)
    assert config.access_log is False and not logging.getLogger("uvicorn.access").handlers
    record = logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, INVALID_REQUEST, None, None)
    other = logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, "Exception in ASGI application", None,
                              None)
    assert not QUIET_INVALID_REQUESTS.filter(record) and QUIET_INVALID_REQUESTS.filter(other)


def test_the_medusa_metric_says_whether_the_heads_tree_was_verified(artifact, monkeypatch):
    """It said whether a request was *assigned* the heads' tree at admission: greedy requests whose every step ran
    batched on the lanes graph (which runs no heads) read "medusa": true with no step verifying the tree."""
    import medusa_export.runtime.decode as decode_mod
    from medusa_export.runtime.decode import GenerationConfig
    from medusa_export.runtime.engine import Engine
    from medusa_export.runtime.generator import GenerationResult
    from medusa_export.runtime.serve.responses import speculation_metrics
    from medusa_export.runtime.step_tree import HEADS

    verified: dict[int, int] = {}  # id(stats) -> steps whose plan held heads' nodes
    original = decode_mod.record_sources

    def counting(p, accepted, new, spec, stats):
        verified[id(stats)] = verified.get(id(stats), 0) + int(HEADS in p.source.tolist())
        return original(p, accepted, new, spec, stats)

    monkeypatch.setattr(decode_mod, "record_sources", counting)
    rt = load_runtime(artifact)
    try:
        engine = Engine(rt.generator, max_num_seqs=3, max_num_batched_tokens=64)
        finals, seqs = {}, []
        for i in range(3):  # admitted together, same length and budget: every step of each is a batched lanes step
            seqs.append(engine.add([5, 6, 7, 8], GenerationConfig(max_new_tokens=12, ignore_eos=True),
                                   lambda x, i=i: finals.__setitem__(i, x) if isinstance(x, GenerationResult) else None))
        for _ in range(200):  # bounded
            if not engine.step():
                break
        assert len(finals) == 3 and any(finals[i].medusa for i in range(3))  # some were assigned the tree
        for i in range(3):
            said = speculation_metrics([finals[i]])["speculative_decoding"]["medusa"]
            assert said == (verified.get(id(seqs[i].stats), 0) > 0), (i, said, verified)
    finally:
        rt.close()


def test_the_start_line_says_one_sequence_in_the_singular(artifact):
    with serving(artifact, "--max-num-seqs", "1", "--threads", "1") as (_base, proc):
        pass
    line = next(ln for ln in proc.stdout.read().splitlines() if ln.startswith("serving "))
    assert "1 sequence per step" in line and "1 sequences" not in line, line


REQUEST_LINE = re.compile(r"request (?P<id>(chat)?cmpl-[0-9a-f]{32}) choice=(?P<choice>\d+) finish=(?P<finish>[a-z]+) "
                          r"prompt_tokens=(?P<prompt>\d+) cached_tokens=\d+ completion_tokens=(?P<completion>\d+) "
                          r"queue_s=\d+\.\d{3} ttft_s=(\d+\.\d{3}|-) e2e_s=\d+\.\d{3} spec_steps=\d+ "
                          r"accepted_drafts=\d+")


def test_log_requests_writes_a_line_per_answer_with_its_id_counts_and_no_text(artifact):
    """`serve --log-requests`: each answer's line names the id the client got, its choice index and the usage it
    was sent; request text (made to forge lines) appears nowhere."""
    with serving(artifact, "--threads", "1", "--log-requests") as (base, _proc):
        chat = post(base + "/v1/chat/completions", {"messages": [{"role": "user", "content": EVIL}], "max_tokens": 3,
                                                    "temperature": 0})[1]
        batch = post(base + "/v1/completions", {"prompt": [PROMPT, EVIL], "n": 2, "max_tokens": 2, "temperature": 0.5,
                                                "seed": 3, "user": EVIL})[1]
        refused = post(base + "/v1/completions", {"prompt": EVIL, "max_tokens": EVIL})[0]
    log = _proc.stdout.read()
    lines = [ln for ln in log.splitlines() if ln.startswith("request ")]
    assert refused == 400 and not [m for m in MARKERS if m in log], log[-2000:]
    parsed = [REQUEST_LINE.fullmatch(ln) for ln in lines]
    assert all(parsed) and len(parsed) == 5, lines  # the refused request decoded nothing, so it has no line
    by_id: dict[str, list] = {}
    for m in parsed:
        by_id.setdefault(m["id"], []).append(m)
    (one,) = by_id[chat["id"]]
    assert (one["choice"], one["finish"]) == ("0", chat["choices"][0]["finish_reason"])
    assert (int(one["prompt"]), int(one["completion"])) == (chat["usage"]["prompt_tokens"],
                                                            chat["usage"]["completion_tokens"])
    assert sorted(int(m["choice"]) for m in by_id[batch["id"]]) == [c["index"] for c in batch["choices"]] == [0, 1, 2, 3]
    prompt_of = {int(m["choice"]): int(m["prompt"]) for m in by_id[batch["id"]]}  # choices 0-1: PROMPT, 2-3: EVIL
    assert prompt_of[0] == prompt_of[1] != prompt_of[2] == prompt_of[3], prompt_of
    assert sum(int(m["completion"]) for m in by_id[batch["id"]]) == batch["usage"]["completion_tokens"]
