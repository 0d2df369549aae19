"""Which Host headers the server answers (`runtime/serve/host_check.py`): loopback names always, others only when
given, so that a page rebinding its DNS name to 127.0.0.1 cannot use a server on this machine."""

from __future__ import annotations

import pytest

from medusa_export.runtime.errors import InputError
from medusa_export.runtime.serve.host_check import (HostCheck, allowed_hosts_for, host_allowed, host_name,
                                                    hosts_answered, parse_allowed_hosts)


@pytest.mark.parametrize("header, name", [
    ("localhost:8000", "localhost"), ("LocalHost.", "localhost"), ("[::1]:8000", "::1"), ("[::1]", "::1"),
    ("127.0.0.1", "127.0.0.1"), ("api.example.com:443", "api.example.com"), ("::1", "::1"),
    ("localhost:", "localhost"), ("[::1]:", "::1")])
def test_the_name_is_read_without_port_brackets_case_or_trailing_dot(header, name):
    assert host_name(header) == name


@pytest.mark.parametrize("header", ["localhost", "localhost:1", "app.localhost:80", "127.0.0.1:8000", "127.9.9.9",
                                    "[::1]:8000", "[::ffff:127.0.0.1]:80", None])
def test_loopback_names_and_a_missing_header_are_always_answered(header):
    assert host_allowed(header, ())


@pytest.mark.parametrize("header", ["attacker.example", "attacker.example:8000", "0.0.0.0:8000", "10.0.0.5",
                                    "localhost.attacker.example", "[fe80::1]:80", "", "[::1]attacker.example",
                                    "[::1]:80x", "[::1", "[::1%evil.example]", "localhost..", ".localhost",
                                    "localhost\xa0"])
def test_other_names_are_refused_unless_given(header):
    assert not host_allowed(header, ())
    assert host_allowed(header, ("*",))


def test_given_names_a_dot_for_names_under_it_and_addresses():
    allowed = parse_allowed_hosts("API.example.com, .internal ,10.0.0.5,[fe80::1]")
    assert allowed == ("api.example.com", ".internal", "10.0.0.5", "fe80::1")
    for header in ("api.example.com", "api.example.com:8000", "internal", "a.b.internal:1", "10.0.0.5:80",
                   "[fe80::1]:8000"):
        assert host_allowed(header, allowed), header
    for header in ("example.com", "xapi.example.com", "notinternal", "10.0.0.6", "api.example.com.attacker.example"):
        assert not host_allowed(header, allowed), header


@pytest.mark.parametrize("text", ["", "a b", "http://api.example.com", "api.example.com/x", "*.example.com", "a,,b",
                                  "a:8000", "-a.example"])
def test_an_entry_that_is_not_a_host_name_is_one_line(text):
    with pytest.raises(InputError, match="--allowed-hosts: .* is not a host name: give names separated by commas"):
        parse_allowed_hosts(text)


@pytest.mark.parametrize("bind, allowed", [("127.0.0.1", ()), ("::1", ()), ("localhost", ()), ("127.0.0.2", ()),
                                           ("0.0.0.0", ("*",)), ("::", ("*",)), ("192.168.1.5", ("*",))])
def test_the_default_follows_the_address_bound(bind, allowed):
    assert allowed_hosts_for(bind) == allowed


def test_a_bind_name_counts_by_the_addresses_it_resolves_to(monkeypatch):
    """`--host $(hostname)` binds 127.0.1.1 on Debian: loopback, though the name is not one."""
    import socket

    table = {"myhost": ["127.0.1.1"], "dual": ["127.0.0.1", "10.0.0.1"], "v6": ["::1"]}

    def getaddrinfo(name, port):
        if name not in table:
            raise socket.gaierror("no such name")
        return [(socket.AF_INET, socket.SOCK_STREAM, 0, "", (a, 0)) for a in table[name]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert allowed_hosts_for("myhost") == () and allowed_hosts_for("v6") == ()
    assert allowed_hosts_for("dual") == ("*",) and allowed_hosts_for("unknown.example") == ("*",)


def test_the_start_line_says_which_names_are_answered():
    assert hosts_answered(()) == "Host names: loopback"
    assert hosts_answered(("api.example.com",)) == "Host names: loopback, api.example.com"
    assert hosts_answered(("*",)) == "any Host name"


def _call(app, path: str, host: str | None) -> tuple[int, bytes]:
    """One GET through an ASGI app, in-process: (status, body)."""
    import asyncio

    headers = [] if host is None else [(b"host", host.encode())]
    scope = {"type": "http", "http_version": "1.1", "method": "GET", "path": path, "raw_path": path.encode(),
             "root_path": "", "scheme": "http", "query_string": b"", "headers": headers, "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 8000)}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_the_middleware_refuses_with_an_openai_400_and_leaves_probes_open():
    """In-process: a refused request never reaches the app; /health and /ready answer any name."""
    import json

    pytest.importorskip("starlette")
    reached = []

    async def app(scope, receive, send):
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    checked = HostCheck(app, allowed=("api.example.com", "[fe80::1]"))
    status, body = _call(checked, "/v1/models", "attacker.example:8000")
    error = json.loads(body)["error"]
    assert status == 400 and error["code"] == "invalid_host"
    assert "'attacker.example'" in error["message"] and "--allowed-hosts" in error["message"]
    assert _call(checked, "/metrics", "attacker.example")[0] == 400
    assert reached == []
    for path in ("/health", "/ready"):
        assert _call(checked, path, "attacker.example") == (200, b"ok")
    for host in ("api.example.com", "localhost:8000", "127.0.0.1", "[fe80::1]:8000", None):
        assert _call(checked, "/v1/models", host) == (200, b"ok")


def test_settings_take_a_tuple_of_names_only():
    pytest.importorskip("fastapi")
    from medusa_export.runtime.serve.app import ServeSettings

    with pytest.raises(InputError, match="allowed_hosts must be a tuple"):
        ServeSettings(allowed_hosts="api.example.com")
    assert ServeSettings(allowed_hosts=("API.example.com.", "[fe80::1]")).allowed_hosts == ("api.example.com",
                                                                                          "fe80::1")
    assert ServeSettings(allowed_hosts=()).allowed_hosts == ()
    for bad in ("*.example.com", "example.com:8000"):
        with pytest.raises(InputError, match="is not a host name"):
            ServeSettings(allowed_hosts=(bad,))
