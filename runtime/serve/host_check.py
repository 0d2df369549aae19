"""Which ``Host`` headers the server answers: a guard against DNS rebinding.

    allowed = allowed_hosts_for("127.0.0.1")             # () : loopback names only
    allowed = parse_allowed_hosts("api.example.com,.internal")
    app.add_middleware(HostCheck, allowed=allowed)

A web page can point its own DNS name at 127.0.0.1 once it has loaded; its scripts then reach a server on this
machine as if it were their own origin, and read the answers. A browser always sends the name it used in ``Host``,
so a server that answers only the names it is known by (here: loopback names, plus those it was given) refuses such
requests. ``/health`` and ``/ready`` stay open: load balancers probe them by address, and they reveal nothing.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import urllib.parse

from starlette.responses import JSONResponse

from ..errors import InputError
from .requests import ApiError

ANY = "*"
OPEN_PATHS = frozenset({"/health", "/ready"})
_NAME = re.compile(r"\.?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")


def host_name(header: str) -> str:
    """The name part of a ``Host`` header (``name``, ``name:port``, ``[v6]:port``), lower case, no trailing dot."""
    header = header.strip(" \t").lower()
    if header.startswith("["):
        name, bracket, rest = header[1:].partition("]")
        port = rest.removeprefix(":")
        # anything but a port after the address ("[::1]evil.example") is no address: the whole header is the name
        name = name if bracket and (not rest or (rest.startswith(":") and _port(port))) else header
    else:
        name, colon, port = header.rpartition(":")
        name = name if colon and _port(port) and ":" not in name else header
    return name.removesuffix(".")  # one final dot: "localhost." is the same name; "localhost.." is none


def _port(text: str) -> bool:
    """A Host header's port: digits, or empty (RFC 3986 allows "localhost:")."""
    return text.isdigit() or not text


def is_loopback(name: str) -> bool:
    """``localhost``, a name under ``.localhost`` (RFC 6761: always this machine), or a loopback address."""
    if name == "localhost" or (name.endswith(".localhost") and name != ".localhost"):
        return True
    if "%" in name:  # an IPv6 zone ("::1%lo"): Python takes any text there; no browser sends one
        return False
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def host_allowed(header: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a request with this ``Host`` header is answered. None (an HTTP/1.0 request without one) is: browsers
    always send it. ``allowed`` entries: a name, ``.name`` for the name and every name under it, or ``*``."""
    if header is None or ANY in allowed:
        return True
    name = host_name(header)
    if is_loopback(name):
        return True
    return any(name == entry or (entry.startswith(".") and (name == entry[1:] or name.endswith(entry)))
               for entry in allowed)


def allowed_hosts_for(bind_host: str) -> tuple[str, ...]:
    """The default for a server bound to ``bind_host`` (an address, or a name: every address it resolves to counts):
    loopback names only when it binds loopback addresses only; any name otherwise (it serves other machines, under
    names it cannot know)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host_name(bind_host), None)}
    except (OSError, UnicodeError):  # a name that does not resolve binds nothing; judged as written
        addresses = {host_name(bind_host)}
    return () if all(is_loopback(host_name(a)) for a in addresses) else (ANY,)


def hosts_answered(allowed: tuple[str, ...] | None) -> str:
    """For the start-up line: which ``Host`` names the server answers."""
    if allowed and ANY in allowed:
        return "any Host name"
    return "Host names: loopback" + "".join(f", {a}" for a in allowed or ())


def parse_allowed_hosts(text: str) -> tuple[str, ...]:
    """``--allowed-hosts``: names separated by commas; InputError (one line) for an entry that is not a host name,
    ``.name`` or ``*``."""
    entries = tuple(part.strip().lower().rstrip(".") for part in text.split(","))
    for entry in entries:
        if entry != ANY and not _NAME.fullmatch(entry) and not _is_address(entry):
            raise InputError(f"--allowed-hosts: {entry[:80]!r} is not a host name: give names separated by commas "
                             f"(api.example.com, .example.com for every name under it, 10.0.0.5, or * for any)")
    return tuple(entry.strip("[]") for entry in entries)  # an IPv6 address as `host_name` reads it


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def origin_form(target: bytes) -> tuple[bytes, str | None]:
    """A request target's path and the authority it names: ``/v1/models`` -> (itself, None); the absolute form
    ``http://127.0.0.1:8000/v1/models`` (what a client sends through a proxy; RFC 9112 3.2.2: servers must accept it)
    -> (b"/v1/models", "127.0.0.1:8000"). ValueError (one line) for any other target (``*``, ``ftp://...``, a user
    name in the authority)."""
    if target.startswith(b"/"):
        return target, None
    match = _ABSOLUTE.fullmatch(target)  # scheme, user name (refused: RFC 9110 4.2.4), authority, path
    if match is None or match.group(1) or not match.group(2) or match.group(3)[:1] not in (b"", b"/"):
        raise ValueError(f"the request target {target[:80].decode('latin-1')!r} is neither a path (/v1/models) nor "
                         f"an absolute http URL (http://host:port/v1/models)")
    return match.group(3) or b"/", match.group(2).decode("latin-1")


_ABSOLUTE = re.compile(rb"(?i)https?://([^/?#@]*@)?([^/?#]*)(.*)", re.DOTALL)


def same_authority(a: str, b: str) -> bool:
    """Whether two ``Host``-style authorities name the same host and port (case, a final dot and an empty port
    aside); a port given on one side only is the default port, which this comparison cannot know: a mismatch."""
    return (host_name(a), _port_of(a)) == (host_name(b), _port_of(b))


def _port_of(header: str) -> str:
    rest = header.strip(" \t").rpartition("]")[2] if header.strip(" \t").startswith("[") else header.strip(" \t")
    name, colon, port = rest.rpartition(":")
    return port if colon and port.isdigit() and ":" not in name else ""


class HostCheck:
    """ASGI middleware: a 400 for an HTTP request whose ``Host`` the server does not answer (``host_allowed``). A
    request target in absolute form is read as its path, and the authority it names must pass the same check and
    agree with ``Host``: else the app would route by one name and this guard judge another."""

    def __init__(self, app, allowed: tuple[str, ...]) -> None:
        self.app, self.allowed = app, tuple(a.strip("[]") for a in allowed)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                # closed after: the body of a request refused unread must not be read as the next request
                await JSONResponse(refusal.body(), status_code=400, headers={"Connection": "close"})(scope, receive,
                                                                                                      send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope) -> ApiError | None:
        """Why this request is refused, or None; an absolute-form target is rewritten to its path first."""
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
        try:
            path, authority = origin_form(scope.get("raw_path") or scope["path"].encode("utf-8"))
        except ValueError as e:
            return ApiError(400, str(e), code="invalid_request_target")
        if authority is not None:
            if host is not None and not same_authority(host, authority):
                return ApiError(400, f"the request target names {authority[:80]!r} but the Host header "
                                f"{host[:80]!r}: send the same host in both", code="invalid_host")
            _to_origin_form(scope, path, authority, host)
            host = authority
        if scope["path"] in OPEN_PATHS or host_allowed(host, self.allowed):
            return None
        return ApiError(400, f"this server does not answer to the host name {host_name(host)[:80]!r}: call it as "
                        f"localhost or 127.0.0.1, or start it with --allowed-hosts naming it", code="invalid_host")


def _to_origin_form(scope, path: bytes, authority: str, host: str | None) -> None:
    """The scope of an absolute-form request as if its target had been the path (and ``Host`` the authority, for an
    HTTP/1.0 request without one): the routes, and the Origin check, then read it as any other."""
    scope["raw_path"] = path
    scope["path"] = scope.get("root_path", "") + urllib.parse.unquote(path.decode("latin-1"))
    if host is None:
        scope["headers"] = [*scope["headers"], (b"host", authority.encode("latin-1"))]
