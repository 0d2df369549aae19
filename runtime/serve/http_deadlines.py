"""A deadline on a request's headers: uvicorn closes an idle keep-alive connection, but one that opens and sends
part of a request line or headers (or nothing) is held open without end, one socket per client (a slow-loris
client). This protocol closes a connection that has no request in flight ``header_timeout_s`` after it opened or
after its previous response ended: one whose next request line and headers have not all arrived, or one answered
before its body was read (401, 413) that keeps sending that body. The body has its own deadline
(`http_checks.read_body`: the request's timeout, then a 408). A client that stops reading what it is sent (a stream, or
pipelined requests whose answers pile up) is cut off once a whole ``header_timeout_s`` passed with the server's send
buffer full and none of it read: uvicorn would wait for it to drain without end, holding the socket and megabytes
of buffers. A slow reader that keeps reading keeps its connection.

    config = uvicorn.Config(app, http=header_deadline_protocol(30.0), ...)
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import os
import socket
import struct
import sys

from .requests import ApiError


HALF_CLOSED = "medusa_export.half_closed"  # scope key: an HTTP/1.0 client half-closed after its request
PEER_POLL_S = 0.1  # how often a half-closed connection is checked for the client's reset
LINGER_S = 2.0  # after a malformed request's 400: how long the rest of it is read and dropped before the close
INVALID_REQUEST = "Invalid HTTP request received."  # what uvicorn logs for each request h11 cannot parse


class QuietInvalidRequests(logging.Filter):
    """Drops uvicorn's warning for a malformed request: any client could write one line per connection, as many as
    it opens, into a log that is otherwise quiet per request; the line says nothing the client's 400 does not (the
    cause is in that answer, `send_400_response`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != INVALID_REQUEST


QUIET_INVALID_REQUESTS = QuietInvalidRequests()


def half_closed(scope) -> bool:
    """Whether this request's client shut its sending side after the request (`eof_received`)."""
    return bool(scope.get(HALF_CLOSED))


def served_by() -> bytes:
    """The ``X-Served-By`` value, host and process, that every response carries (malformed requests' answers too)."""
    return f"{socket.gethostname()}:{os.getpid()}".encode("latin-1", "replace")


def _reason(status: int) -> bytes:
    """The standard reason phrase of an HTTP status ("Bad Request"), empty for a code without one."""
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def kernel_send_queue(sock) -> int:
    """Bytes in a socket's kernel send queue, not yet acknowledged by the peer (Linux's SIOCOUTQ); 0 where the
    system cannot say."""
    try:
        import fcntl
        import termios

        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (ImportError, AttributeError, OSError, ValueError):
        return 0


def _ambiguous_framing(request) -> bool:
    """A body framed both by Transfer-Encoding and Content-Length, or by Transfer-Encoding on HTTP/1.0: h11 reads
    it as chunked and keeps the connection, where a proxy in front may have read it by its length, so what the
    proxy took for a body's tail would be served as a request of its own (request smuggling; RFC 9112, 6.1 says
    such a request must end its connection). Refused as malformed, which closes it."""
    names = {name for name, _ in request.headers}
    return b"transfer-encoding" in names and (b"content-length" in names or request.http_version == b"1.0")


def header_deadline_protocol(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol with the header deadline (a class, as uvicorn's ``http`` option takes)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderLimitedConnection(h11.Connection):
        """h11 refuses a header block past its limit only while the block is incomplete: one that arrived whole in
        one read of the socket was parsed, whatever its size. This refuses it too (431, `send_400_response`), and
        notes whether the response under way is server-sent events."""

        event_stream = False  # the response under way is server-sent events (`eof_received`)

        def send(self, event):
            if isinstance(event, h11.Response):
                self.event_stream = any(k == b"content-type" and v.lower().startswith(b"text/event-stream")
                                        for k, v in event.headers)
            return super().send(event)

        def next_event(self):
            buffered = len(self._receive_buffer)
            event = super().next_event()
            # The bytes the request's line and headers took as sent (blank line, whitespace and bare LFs included)
            taken = buffered - len(self._receive_buffer)
            if isinstance(event, h11.Request) and taken > self._max_incomplete_event_size:
                raise h11.RemoteProtocolError("request headers too large", error_status_hint=431)
            if isinstance(event, h11.Request) and _ambiguous_framing(event):
                raise h11.RemoteProtocolError("Transfer-Encoding with Content-Length, or on HTTP/1.0")
            return event

    class HeaderDeadlineProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _write_timer: asyncio.TimerHandle | None = None
        _unsent = 0  # `_unsent_bytes` when the write deadline was last set
        _refused = False  # answered as malformed: what else arrives is dropped until the close

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.conn = HeaderLimitedConnection(h11.SERVER, self.conn._max_incomplete_event_size)

        def _unsupported_upgrade_warning(self) -> None:
            """Nothing: an ``Upgrade`` header (h2c, websocket) is ignored and the request answered as HTTP/1.1, as
            RFC 9110 allows. uvicorn logged two warnings for each such request (one advising to install a WebSocket
            library), so any client could fill the server's log, which is otherwise quiet per request."""

        def send_400_response(self, msg: str) -> None:
            """An OpenAI-style error for a request h11 could not parse (uvicorn sent a plain-text 400 without the
            cause): 431 for headers past h11's size limit, else a 400 saying what was malformed. uvicorn calls it
            from the ``except`` clause that caught h11's error, which is where the cause is read."""
            error = sys.exc_info()[1]
            status = getattr(error, "error_status_hint", 400)
            cause = str(error).splitlines()[0][:120] if error is not None and str(error) else msg
            what = ("the request headers are too large: send fewer or shorter headers" if status == 431 else
                    f"the request is not valid HTTP/1.1 ({cause})")
            body = json.dumps(ApiError(status, what, code="invalid_http_request").body()).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                       (b"connection", b"close"), (b"x-served-by", served_by())]
            reason = _reason(status)
            for event in (h11.Response(status_code=status, headers=headers, reason=reason), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self._linger()

        def _linger(self) -> None:
            """Close after the answer, reading and dropping what the client still sends for up to LINGER_S: closed
            with its unread bytes (the rest of 100 kB of headers), the socket sends a reset, and the client loses
            the answer it was sent."""
            self._refused = True
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.flow.resume_reading()
            self.loop.call_later(LINGER_S, self.transport.close)

        def data_received(self, data: bytes) -> None:
            if not self._refused:  # else: the rest of a request refused as malformed, dropped
                super().data_received(data)

        def eof_received(self) -> bool | None:
            """The client shut its sending side (``shutdown(SHUT_WR)``, ``nc -N``) or closed: TCP cannot tell
            which until something is written to it (a closed one answers with a reset). uvicorn closed the
            connection either way, so a client that half-closed after a whole request got no answer. With such a
            request in flight the connection now stays open for the answer (then closes) and is watched for that
            reset (`_watch_peer`); an HTTP/1.1 request not yet answered is sent a ``100 Continue`` to draw it out
            (clients must skip a 1xx they did not ask for, RFC 9110 15.2). An HTTP/1.0 one cannot be, so its
            scope is marked `half_closed` and a request waiting for its whole answer stops (`app`). Without a
            request in flight (or with one cut mid-body) it closes, as before."""
            cycle = self.cycle
            if self._refused or cycle is None or cycle.more_body or cycle.response_complete:
                return None  # asyncio closes the transport
            cycle.keep_alive = False
            if self.conn.our_state is h11.SEND_RESPONSE:
                if self.conn.their_http_version == b"1.1":
                    cycle.waiting_for_100_continue = False  # sent here; uvicorn would send it again
                    self.transport.write(self.conn.send(h11.InformationalResponse(status_code=100, headers=[],
                                                                                  reason=b"Continue")))
                else:
                    cycle.scope[HALF_CLOSED] = True
                    cycle.message_event.set()  # wakes a handler waiting in `receive` for a disconnect
            elif self.conn.our_state is h11.SEND_BODY and self.conn.event_stream:
                # A stream whose request still waits in the queue (or prefills) writes nothing: an SSE comment, which
                # clients skip, draws out a closed client's reset, so its queued choices leave at once
                self.transport.write(self.conn.send(h11.Data(data=b":\n\n")))
            self._watch_peer()
            return True

        def _watch_peer(self) -> None:
            """Every PEER_POLL_S while the answer goes out to a half-closed connection: a reset from the client
            (it had closed) drops the connection, and its request sees a disconnect and stops."""
            if self.transport.is_closing() or self.cycle is None or self.cycle.response_complete:
                return
            sock = self.transport.get_extra_info("socket")
            try:
                reset = sock is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
            except OSError:
                reset = True
            if reset:
                self.transport.abort()
                return
            self.loop.call_later(PEER_POLL_S, self._watch_peer)

        def connection_made(self, transport) -> None:  # type: ignore[override]
            self.logger.addFilter(QUIET_INVALID_REQUESTS)  # once: the same filter is not added twice
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request on this connection gets its own deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            self._stop_write_timer()
            super().connection_lost(exc)

        def pause_writing(self) -> None:  # the transport's buffer is full: the client reads slower than we write
            super().pause_writing()
            self._watch_writes()

        def _watch_writes(self) -> None:
            self._stop_write_timer()
            self._unsent = self._unsent_bytes()
            self._write_timer = self.loop.call_later(header_timeout_s, self._on_write_stall)

        def _unsent_bytes(self) -> int:
            """Bytes written and not yet taken by the client: the transport's buffer and the kernel's send queue.
            The kernel's counts too: it can hold megabytes, and it tells the transport it has room only once
            about half of that has gone, so a slow reader can take a while to move the transport's count."""
            return self.transport.get_write_buffer_size() + kernel_send_queue(self.transport.get_extra_info("socket"))

        def resume_writing(self) -> None:
            self._stop_write_timer()
            super().resume_writing()

        def _stop_write_timer(self) -> None:
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None

        def _on_write_stall(self) -> None:
            """The deadline passed with the buffer still full. A client that read some of it meanwhile (a slow
            link) gets another period; one that read nothing is dropped with what it has not read (``close``, the
            header deadline's included, would wait to send it), and its request sees a disconnect and stops."""
            self._write_timer = None
            if self._unsent_bytes() < self._unsent:
                self._watch_writes()
                return
            sock = self.transport.get_extra_info("socket")
            try:  # a reset, not a close: the kernel would hold the unsent megabytes for minutes, retrying
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except (AttributeError, OSError):
                pass
            self.transport.abort()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._on_deadline)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _on_deadline(self) -> None:
            """Close the connection unless a request is in flight: one still waiting for a request's headers, or
            one whose response went out before its body was read (a 401, a 413) while the client trickles the rest
            of that body in."""
            self._header_timer = None
            in_flight = self.cycle is not None and not self.cycle.response_complete
            if not self.transport.is_closing() and not in_flight:
                self.transport.close()

    return HeaderDeadlineProtocol
