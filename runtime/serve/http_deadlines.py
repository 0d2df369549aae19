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
import socket
import struct


def kernel_send_queue(sock) -> int:
    """Bytes in a socket's kernel send queue, not yet acknowledged by the peer (Linux's SIOCOUTQ); 0 where the
    system cannot say."""
    try:
        import fcntl
        import termios

        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (ImportError, AttributeError, OSError, ValueError):
        return 0


def header_deadline_protocol(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol with the header deadline (a class, as uvicorn's ``http`` option takes)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _write_timer: asyncio.TimerHandle | None = None
        _unsent = 0  # `_unsent_bytes` when the write deadline was last set

        def _unsupported_upgrade_warning(self) -> None:
            """Nothing: an ``Upgrade`` header (h2c, websocket) is ignored and the request answered as HTTP/1.1, as
            RFC 9110 allows. uvicorn logged two warnings for each such request (one advising to install a WebSocket
            library), so any client could fill the server's log, which is otherwise quiet per request."""

        def connection_made(self, transport) -> None:  # type: ignore[override]
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
