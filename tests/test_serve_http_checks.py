"""What a request must pass before its JSON is parsed (`runtime/serve/http_checks.py`), on a real uvicorn on
127.0.0.1 (`medusa-export serve`): a body declared JSON and uncompressed, no web page of another origin, no host name
rebound to this machine. After each, the server still answers."""

from __future__ import annotations

import gzip
import http.client
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from serve_helpers import KEY, PROMPT, assert_still_serving, build_chat_artifact, serving  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_dirs, tmp_path_factory):
    artifact = build_chat_artifact(tiny_dirs, tmp_path_factory.mktemp("http_checks"))
    with serving(artifact, "--max-num-seqs", "2", "--max-queue", "2", "--threads", "1", "--api-key", KEY) as (base, _):
        yield base


@pytest.fixture(autouse=True)
def still_serving(server):
    """After every test here the server answers a normal request."""
    yield
    assert_still_serving(server)


@pytest.mark.parametrize("content_type, status", [
    ("text/plain;charset=UTF-8", 415), ("application/x-www-form-urlencoded", 415), ("multipart/form-data", 415),
    ("application/json; charset=utf-8", 200), ("application/vnd.api+json", 200), (None, 200)])
def test_only_a_body_declared_json_or_undeclared_is_read(server, content_type, status):
    """A browser sends a cross-origin POST of text/plain or a form without asking first: read as JSON, any web page
    could make a server on localhost without an API key generate."""
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Authorization": f"Bearer {KEY}", **({"Content-Type": content_type} if content_type else {})}
    conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 2}), headers)
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == status, body
    if status == 415:
        assert body["error"]["code"] == "unsupported_media_type" and "application/json" in body["error"]["message"]


@pytest.mark.parametrize("encoding, status", [("gzip", 415), ("br", 415), ("gzip, identity", 415),
                                              ("identity", 200), ("", 200)])
def test_a_body_declared_compressed_is_refused_not_misread(server, encoding, status):
    """The server does not decompress: a gzip body was read as JSON (a 400 about a 0x8b byte), and a plain body
    mislabelled ``br`` was answered as if plain. Both now get a 415 naming the encoding, before the body is read
    (so the connection closes)."""
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    raw = json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode()
    body = gzip.compress(raw) if encoding.startswith("gzip") else raw
    conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}", "Content-Encoding": encoding,
                                                   "Content-Type": "application/json"})
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    conn.close()
    assert resp.status == status, answer
    if status == 415:
        assert answer["error"]["code"] == "unsupported_content_encoding" and encoding in answer["error"]["message"]
        assert resp.getheader("connection") == "close"


@pytest.mark.parametrize("extra, status", [
    ({"Sec-Fetch-Site": "cross-site"}, 403), ({"Origin": "https://attacker.example"}, 403), ({"Origin": "null"}, 403),
    ({"Origin": "http://["}, 403), ({"Origin": "http://a]"}, 403),  # not URLs: were 500s
    ({"Sec-Fetch-Site": "none"}, 200), ({"Sec-Fetch-Site": "same-origin"}, 200), ({"Origin": "SERVER"}, 200)])
def test_a_post_from_a_web_page_of_another_origin_is_refused(server, extra, status):
    """A page may post a body without a Content-Type and without asking first (fetch in no-cors mode, sendBeacon):
    such a request carries the browser's Origin or Sec-Fetch-Site, which programs do not send."""
    host, port = server.removeprefix("http://").split(":")
    extra = {k: (server if v == "SERVER" else v) for k, v in extra.items()}
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 2}),
                 {"Authorization": f"Bearer {KEY}", **extra})  # no Content-Type, as such a page sends it
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == status, body
    if status == 403:
        assert body["error"]["code"] == "cross_origin"


@pytest.mark.parametrize("method, path", [("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/metrics")])
def test_a_host_name_rebound_to_this_machine_is_refused(server, method, path):
    """A page that points its own DNS name at 127.0.0.1 is same-origin to the server (no Origin check helps): a
    server bound to a loopback address answers loopback names only (docs/serving.md, Security)."""
    host, port = server.removeprefix("http://").split(":")
    for name, status in ((f"attacker.example:{port}", 400), (f"localhost:{port}", 200), (f"127.0.0.1:{port}", 200)):
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        body = json.dumps({"prompt": PROMPT, "max_tokens": 2}) if method == "POST" else None
        conn.request(method, path, body, {"Host": name, "Authorization": f"Bearer {KEY}",
                                          "Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        assert resp.status == status, (name, data)
        if status == 400:
            assert json.loads(data)["error"]["code"] == "invalid_host"
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("GET", "/health", headers={"Host": "attacker.example"})  # probes stay open: they reveal nothing
    assert conn.getresponse().status == 200
    conn.close()
