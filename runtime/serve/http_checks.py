"""What an HTTP request must pass before its JSON is parsed: the API key, the origin (no web page of another site),
a body declared JSON and uncompressed, within its size and time limits, and UTF-8 JSON. Each refusal is an
`ApiError` (an OpenAI-style 4xx).

    check_json_type(request.headers.get("content-type"))    # 415 unless JSON or undeclared
    body = await read_body(request, limit, timeout_s)        # 413 / 408 / 400
    value = json_body(body)                                  # 400 unless UTF-8 JSON
"""

from __future__ import annotations

import asyncio
import hmac
import json
import urllib.parse

from fastapi import Request
from starlette.requests import ClientDisconnect

from .requests import ApiError


def authorize(request, api_key: str | None) -> None:
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(token.encode(), api_key.encode()):
        # OpenAI's 401: type invalid_request_error, code invalid_api_key
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")


def check_not_cross_origin(headers) -> None:
    """A 403 for a POST a browser sent from another site's page (``Sec-Fetch-Site: cross-site``) or from another
    origin than this server's (``Origin`` naming another host than ``Host``). A page may send a body without a
    ``Content-Type`` and without asking first (``fetch`` in no-cors mode, ``sendBeacon``); programs (curl, SDKs) send
    neither header, and a page served from elsewhere could not read the answers anyway, for this server sends no
    CORS headers."""
    origin = headers.get("origin")
    if headers.get("sec-fetch-site", "").lower() == "cross-site" or (
            origin is not None and _origin_host(origin) != headers.get("host", "").lower()):
        raise ApiError(403, "requests sent by a web page of another origin are refused: call the API from a program "
                       "(no Origin header), or serve the page from this server's origin", code="cross_origin")


def _origin_host(origin: str) -> str | None:
    """The host (and port) an ``Origin`` names; None for one that is not a URL (``http://[``), which no origin
    matches."""
    try:
        return urllib.parse.urlsplit(origin).netloc.lower()
    except ValueError:
        return None


def check_json_type(content_type: str | None) -> None:
    """A 415 unless the body is declared JSON (``application/json`` or a ``+json`` type) or not declared at all. A
    browser sends a cross-origin POST of ``text/plain`` or a form without asking first: were those read as JSON,
    any web page its user opened could make a server on localhost without an API key generate."""
    if content_type is None:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise ApiError(415, f"the request body must be JSON, sent as Content-Type: application/json (got "
                       f"{media[:80]!r})", code="unsupported_media_type")


def check_identity_encoding(encoding: str | None) -> None:
    """A 415 for a body declared compressed (``Content-Encoding: gzip``): this server does not decompress, so it
    would read the compressed bytes as JSON (a misleading 400), or read a body mislabelled ``br`` as plain."""
    if encoding is None or encoding.strip().lower() in ("", "identity"):
        return
    raise ApiError(415, f"Content-Encoding {encoding[:40]!r} is not supported: send the JSON body uncompressed",
                   code="unsupported_content_encoding")


async def read_body(request, limit: int, timeout_s: float = 300.0) -> bytes:
    """The body, at most ``limit`` bytes (413), arrived within ``timeout_s`` (408: a client that sends part of it
    and stalls would otherwise hold its handler without end)."""
    too_large = ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large  # refused before reading it
    body = bytearray()

    async def read() -> None:
        async for part in request.stream():
            body.extend(part)
            if len(body) > limit:
                raise too_large

    try:
        await asyncio.wait_for(read(), timeout_s)
    except ClientDisconnect:  # nobody reads this answer; it ends the handler quietly
        raise ApiError(400, "the client disconnected before sending the whole request body") from None
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s", code="request_timeout",
                       headers={"Connection": "close"}) from None
    request.state.body_read = True
    return bytes(body)


def closing_if_unread(request: Request, headers: dict[str, str] | None) -> dict[str, str] | None:
    """``Connection: close`` on an answer sent before the request's body was read (a 401, 404, 413, 415): a client
    that asked ``Expect: 100-continue`` may then skip the body, and the connection's next bytes would be read as it
    (RFC 9110 10.1.1: say whether the connection stays)."""
    declared = request.headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in request.headers
    if not declared or getattr(request.state, "body_read", False):
        return headers
    return {**(headers or {}), "Connection": "close"}


def json_body(body: bytes):
    try:  # UTF-8 only (RFC 8259; a byte order mark is skipped): json.loads would also take UTF-16 and UTF-32
        return json.loads(body.decode("utf-8-sig"))
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON ({str(e)[:120]})") from None
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 ({str(e)[:120]}): send JSON in UTF-8") from None
    except ValueError:  # an integer beyond Python's 4,300 digits (its message advises a Python call)
        raise ApiError(400, "the request body holds an integer of more than 4,300 digits: send a number the "
                       "parameter takes") from None
    except RecursionError:
        raise ApiError(400, "the request body nests JSON too deeply: send a flat OpenAI request") from None
