"""A deadline on a request's headers: uvicorn closes an idle keep-alive connection, but one that opens and sends
part of a request line or headers (or nothing) is held open without end, one socket per client (a slow-loris
client). This protocol closes a connection whose next request's headers have not all arrived within
``header_timeout_s`` of the connection opening or of the previous response ending. The body has its own deadline
(`app._read_body`: the request's timeout, then a 408).

    config = uvicorn.Config(app, http=header_deadline_protocol(30.0), ...)
"""

from __future__ import annotations

import asyncio


def header_deadline_protocol(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol with the header deadline (a class, as uvicorn's ``http`` option takes)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request on this connection gets its own deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._on_deadline)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _on_deadline(self) -> None:
            """Close the connection if it is still waiting for a request's headers (h11: the client IDLE or its
            request line / headers unfinished); a request in flight keeps its connection."""
            self._header_timer = None
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self.transport.close()

    return HeaderDeadlineProtocol
