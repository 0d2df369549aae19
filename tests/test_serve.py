"""`medusa-export serve` against a real uvicorn on 127.0.0.1, started with the project's own command, driven by
the official `openai` client (and raw HTTP for what the client will not send): lossless greedy through the
server, streaming, stop, usage, per-request acceptance, overload (429), disconnect, bad requests, metrics.
Hostile and careless clients: tests/test_serve_hostile.py."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")

from serve_helpers import (KEY, LONG, PROMPT, build_chat_artifact, free_port as _free_port, get as _get,  # noqa: E402
                           load_runtime, metric as _metric, openai_client, post as _post, serving, wait_idle)


@pytest.fixture(scope="module")
def long_artifact(tiny_dirs, tmp_path_factory):
    return build_chat_artifact(tiny_dirs, tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(long_artifact):
    with serving(long_artifact, "--max-num-seqs", "1", "--max-queue", "1", "--threads", "1", "--api-key", KEY) as (base, _):
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def runtime(long_artifact):
    return load_runtime(long_artifact)


def _model(client) -> str:
    return client.models.list().data[0].id


# ------------------------------------------------------------------------------------------- lossless, API


def test_greedy_chat_streamed_equals_plain_equals_runtime_and_vanilla(client, runtime):
    msgs = [{"role": "user", "content": PROMPT}]
    ids = runtime.generator.tokenizer.encode_chat(msgs)
    want = runtime.generate(ids, max_new_tokens=40, medusa=False, ignore_eos=True)  # greedy vanilla
    assert runtime.generate(ids, max_new_tokens=40, ignore_eos=True).token_ids == want.token_ids
    plain = client.chat.completions.create(model=_model(client), messages=msgs, max_tokens=40, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert plain.choices[0].message.content == want.text
    assert plain.choices[0].finish_reason == "length"
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (len(ids), 40)
    spec = plain.model_extra["metrics"]["speculative_decoding"]
    assert spec["medusa"] and spec["steps"] >= 1 and spec["mean_accepted_tokens_per_step"] >= 1
    assert sum(spec["accepted_tokens_per_position"][:1]) <= spec["steps"]
    chunks = list(client.chat.completions.create(model=_model(client), messages=msgs, max_tokens=40, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 40 and not chunks[-1].choices
    off = client.chat.completions.create(model=_model(client), messages=msgs, max_tokens=40, temperature=0,
                                         extra_body={"medusa": False, "ignore_eos": True})
    assert off.choices[0].message.content == want.text
    assert off.model_extra["metrics"]["speculative_decoding"]["medusa"] is False


def _events(base: str, body: dict) -> list[dict]:
    """The JSON events of a streamed request, read raw (the openai client shows an absent field as None too)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200
    lines = [line[len("data: "):] for line in resp.read().decode().split("\n\n") if line.startswith("data: ")]
    conn.close()
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize("include", [True, False])
def test_with_include_usage_every_chunk_carries_usage(server, include):
    """OpenAI's stream with include_usage: "usage" null on every chunk, then a last chunk with it and no choices;
    without it, no chunk has the field."""
    events = _events(server, {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True,
                              "stream_options": {"include_usage": include}, "ignore_eos": True})
    if include:
        assert all("usage" in e and e["usage"] is None for e in events[:-1])
        assert events[-1]["usage"]["completion_tokens"] == 5 and events[-1]["choices"] == []
    else:
        assert not any("usage" in e for e in events) and events[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_and_completions(client, runtime):
    tok = runtime.generator.tokenizer
    msgs = [{"role": "user", "content": PROMPT}]
    words = runtime.generate(tok.encode_chat(msgs), max_new_tokens=12, medusa=False, ignore_eos=True).text.split()
    stop = words[5]
    cut = client.chat.completions.create(model=_model(client), messages=msgs, max_tokens=12, temperature=0, stop=[stop],
                                         extra_body={"ignore_eos": True})
    out = cut.choices[0].message.content
    assert stop not in out and " ".join(words).startswith(out.rstrip()) and cut.choices[0].finish_reason == "stop"
    words = runtime.generate(tok.encode(PROMPT), max_new_tokens=12, medusa=False, ignore_eos=True).text.split()
    comp = client.completions.create(model=_model(client), prompt=PROMPT, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert comp.choices[0].text == " ".join(words) and comp.usage.completion_tokens == 12
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=_model(client), prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
        extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == comp.choices[0].text


# ------------------------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": PROMPT}]}, 404, "model"),
    ({"messages": [{"role": "user", "content": PROMPT}], "n": 0}, 400, "n"),
    ({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": -3}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": PROMPT}], "logprobs": 2}, 400, "logprobs"),  # chat's is true/false
    ({"messages": [{"role": "user", "content": " ".join(["t9"] * 2100)}], "max_tokens": 4}, 400, "messages"),
    ({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2047}, 400, "max_tokens"),
    ({"messages": []}, 400, "messages"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    code, err, _ = _post(server + "/v1/chat/completions", body)
    assert code == status and err["error"]["message"] and err["error"]["param"] == param
    assert _get(server + "/health")[0] == 200  # still up


def test_api_key_is_required(server):
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2}
    for key in (None, "sk-wrong"):
        code, err, _ = _post(server + "/v1/chat/completions", body, key=key)
        assert code == 401 and err["error"]["code"] == "invalid_api_key"
    assert _get(server + "/v1/models")[0] == 401
    assert _get(server + "/v1/models", {"Authorization": f"Bearer {KEY}"})[0] == 200


def test_request_body_limit(server):
    """A body declared larger than the limit is refused before it is read (the client gets 413 at once)."""
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/completions")
    for k, v in (("Content-Type", "application/json"), ("Authorization", f"Bearer {KEY}"),
                 ("Content-Length", str(4 << 20))):
        conn.putheader(k, v)
    conn.endheaders()
    conn.send(b'{"prompt": "t1 t2')  # the start of a 4 MiB body
    resp = conn.getresponse()
    assert resp.status == 413 and "larger than" in json.loads(resp.read())["error"]["message"]
    conn.close()
    assert _get(server + "/health")[0] == 200


# ------------------------------------------------------------------------------------------- load


def _open_stream(server: str) -> http.client.HTTPConnection:
    """A long streamed completion, left open (the caller closes it)."""
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "stream": True, "medusa": False,
                       "ignore_eos": True})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200
    # events as they are sent: no cache, no proxy buffering (nginx reads X-Accel-Buffering)
    assert resp.getheader("Cache-Control") == "no-cache" and resp.getheader("X-Accel-Buffering") == "no"
    return conn


def _until(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # bounded
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_full_queue_gets_429_and_the_server_keeps_serving(server):
    """1 worker, --max-queue 1: one request runs, one waits, the next gets 429 with Retry-After."""
    wait_idle(server)
    running = _open_stream(server)
    _until(lambda: _metric(server, "num_requests_running") == 1)
    waiting = _open_stream(server)
    _until(lambda: _metric(server, "num_requests_waiting") == 1)
    code, err, headers = _post(server + "/v1/completions", {"prompt": PROMPT, "max_tokens": 3})
    assert code == 429 and err["error"]["type"] == "rate_limit_error" and headers.get("Retry-After") == "1"
    for conn in (running, waiting):
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    wait_idle(server)
    assert _post(server + "/v1/completions", {"prompt": PROMPT, "max_tokens": 3})[0] == 200


def test_disconnect_mid_stream_stops_decoding(server):
    conn = _open_stream(server)
    _until(lambda: _metric(server, "decode_steps_total") > 0)
    before = _metric(server, "decode_steps_total")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_idle(server)  # the worker let go of it
    settled = _metric(server, "decode_steps_total")
    assert settled - before < LONG / 2  # it stopped well before the end
    assert _metric(server, "num_requests_running") == 0 and _metric(server, "decode_steps_total") == settled


# ------------------------------------------------------------------------------------------- metrics


def test_metrics_reconcile_with_per_request_statistics(client, server):
    before = {n: _metric(server, n) for n in ("generation_tokens_total", "spec_decode_num_accepted_tokens_total",
                                              "spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total",
                                              "e2e_request_latency_seconds_count")}
    usage, accepted, steps, drafts = 0, 0, 0, 0
    for i, medusa in enumerate((True, True, False)):
        r = client.completions.create(model=_model(client), prompt=f"t{5 + i} t6 t7", max_tokens=30, temperature=0,
                                      extra_body={"medusa": medusa})
        spec = r.model_extra["metrics"]["speculative_decoding"]
        usage += r.usage.completion_tokens
        accepted += spec["accepted_tokens"]
        drafts += spec["draft_tokens"]
        steps += spec["steps"] if spec["draft_tokens"] else 0  # requests that verified drafts
        assert sum(spec["accepted_tokens_per_position"]) == spec["accepted_tokens"]
        assert spec["accepted_from_heads"] + spec["accepted_from_drafts"] == spec["accepted_tokens"]
    after = {n: _metric(server, n) for n in before}
    assert after["generation_tokens_total"] - before["generation_tokens_total"] == usage
    assert after["spec_decode_num_accepted_tokens_total"] - before["spec_decode_num_accepted_tokens_total"] == accepted
    assert after["spec_decode_num_drafts_total"] - before["spec_decode_num_drafts_total"] == steps
    assert after["spec_decode_num_draft_tokens_total"] - before["spec_decode_num_draft_tokens_total"] == drafts
    assert after["e2e_request_latency_seconds_count"] - before["e2e_request_latency_seconds_count"] == 3
    # the prompt alone (echo, max_tokens 0) decodes one token it never returns: it was counted as generated
    r = client.completions.create(model=_model(client), prompt="t5 t6", max_tokens=0, echo=True, n=2)
    assert r.usage.completion_tokens == 0
    assert _metric(server, "generation_tokens_total") == after["generation_tokens_total"]
    text = _get(server + "/metrics")[1].decode()
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "request_queue_time_seconds",
                 "num_requests_waiting", "spec_decode_num_accepted_tokens_per_pos", "tokens_per_step"):
        assert f"medusa_export:{name}" in text


def test_graceful_shutdown_finishes_in_flight_and_refuses_new(long_artifact):
    """SIGTERM: the running stream still ends with [DONE]; new connections are refused; the process exits 0."""
    with serving(long_artifact, "--threads", "1") as (base, proc):
        host, port = base.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        body = json.dumps({"prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "stream": True, "medusa": False,
                           "ignore_eos": True})
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read1(64)
        proc.terminate()

        def refused() -> bool:
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                return False
            except OSError:
                return True

        _until(refused)  # the listening socket is closed: no new requests
        rest = resp.read().decode()
        assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in rest
        assert proc.wait(timeout=60) == 0  # a clean drain exits 0, as process managers expect


def test_sigint_drains_and_exits_130_also_in_a_scripts_background_job(long_artifact):
    """A script's `serve ... &` starts with SIGINT ignored; `kill -INT` still stops it, and it must exit 130 as Ctrl-C
    in a terminal does (it exited 0, the code of a clean SIGTERM drain)."""
    with serving(long_artifact, "--threads", "1", sigint_ignored=True) as (_, proc):
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, proc.stdout.read()


def test_shutdown_past_its_deadline_ends_requests_with_503_and_exits_1(long_artifact):
    """SIGTERM with --shutdown-timeout 0: the running stream ends with an error event and [DONE], the queued request
    gets an OpenAI-style 503 with Retry-After, and serve exits 1 saying why. uvicorn's own deadline cancelled the
    handlers instead: a bare text 500, a stream cut without [DONE], and exit 0."""
    import threading

    with serving(long_artifact, "--threads", "1", "--max-num-seqs", "1", "--max-queue", "2",
                 "--shutdown-timeout", "0") as (base, proc):
        host, port = base.removeprefix("http://").split(":")
        stream = http.client.HTTPConnection(host, int(port), timeout=60)
        body = {"prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "ignore_eos": True}
        stream.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                       {"Content-Type": "application/json"})
        resp = stream.getresponse()
        assert resp.status == 200 and resp.read1(64)
        queued: dict = {}
        waiter = threading.Thread(target=lambda: queued.update(zip(("status", "body", "headers"),
                                                                   _post(base + "/v1/completions", body, key=None))))
        waiter.start()
        _until(lambda: _metric(base, "num_requests_waiting") == 1)
        proc.terminate()
        rest = resp.read().decode()
        waiter.join(60)
        assert proc.wait(timeout=60) == 1
        assert "requests were still running" in proc.stdout.read()
    events = [line.removeprefix("data: ") for line in rest.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "shut down" in json.loads(events[-2])["error"]["message"]
    assert queued["status"] == 503 and queued["body"]["error"]["type"] == "server_error"
    assert "shut down" in queued["body"]["error"]["message"] and queued["headers"].get("Retry-After") == "1"


def test_health_and_ready_answer_head_requests(server):
    """Load balancers' health checks often send HEAD: it got 405."""
    host, port = server.removeprefix("http://").split(":")
    for path in ("/health", "/ready"):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("HEAD", path)
        r = conn.getresponse()
        assert r.status == 200 and r.read() == b""
        conn.close()


@pytest.mark.slow
def test_ray_serve_two_replicas_answer_and_stream(long_artifact, runtime):
    """The same app on Ray Serve: two replicas on a local 2-CPU Ray both answer; streaming works through the proxy."""
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from medusa_export.runtime.serve.app import ServeSettings
    from medusa_export.runtime.serve.ray_app import deployment

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(str(long_artifact), settings=ServeSettings(max_num_seqs=1, max_queue=2), replicas=2, threads=1),
                  name="medusa", route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        want = runtime.generate(runtime.generator.tokenizer.encode(PROMPT), max_new_tokens=16, medusa=False).text
        replicas = set()
        for _ in range(30):  # bounded: the proxy spreads requests over the replicas
            raw = client.completions.with_raw_response.create(model=_model(client), prompt=PROMPT, max_tokens=16,
                                                              temperature=0)
            assert raw.parse().choices[0].text == want
            replicas.add(raw.headers["x-served-by"])
            if len(replicas) == 2:
                break
        assert len(replicas) == 2
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=_model(client), prompt=PROMPT, max_tokens=16, temperature=0, stream=True) if c.choices)
        assert streamed == want
    finally:
        serve.shutdown()
        ray.shutdown()
