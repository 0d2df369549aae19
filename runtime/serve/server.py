"""Load an artifact and serve it with uvicorn (what `medusa-export serve` runs).

    run_server("artifacts/smollm2", host="127.0.0.1", port=8000, settings=ServeSettings(max_num_seqs=8))
"""

from __future__ import annotations

import dataclasses
import signal
import socket

from .. import extras
from ..errors import InputError
from ..machine import usable_cpus
from ..warm_up import warm_up
from .app import ServeSettings, create_app
from .host_check import allowed_hosts_for, hosts_answered
from .http_deadlines import header_deadline_protocol

RESPONSES_S = 5.0  # after the drain: for the handlers to send their last bytes (then uvicorn cancels them)


def run_server(artifact: str, host: str = "127.0.0.1", port: int = 8000, backend: str = "ort",
               settings: ServeSettings = ServeSettings(), threads: int | None = None, tree: str | None = None,
               shutdown_deadline_s: float = 30.0, log=print) -> bool:
    """Serve until SIGINT/SIGTERM; True when every admitted request had ended when it stopped (a clean drain)."""
    extras.require("serve", "serve")
    from ..api import MedusaRuntime

    sock = listening_socket(host, port)  # before the model loads: a busy port fails at once, in one line
    settings = with_bound_hosts(settings, sock.getsockname()[0])  # the address bound, not the name given
    try:
        runtime = MedusaRuntime.load(artifact, backend=backend, tree=tree, threads=threads or usable_cpus())
    except BaseException:
        sock.close()
        raise
    app = create_app(runtime, settings)
    for note in runtime.notes:
        log(f"note: {note}")
    engine = app.state.scheduler.engine
    try:
        log(f"warmed up: every kind of step ran once ({warm_up(engine):.1f} s)")
    except BaseException:
        sock.close()
        runtime.close()
        raise
    seqs = f"{engine.max_num_seqs} sequence{'s' * (engine.max_num_seqs != 1)}"
    log(f"serving {settings.model_name or runtime.manifest.model.name} from {artifact} on {server_url(sock)} "
        f"({backend}; {seqs} per step, {engine.max_num_batched_tokens} tokens per step, "
        f"queue {settings.max_queue}; prefix caching {'on' if engine.prefixes.enabled else 'off'}; "
        f"KV cache reserved for {seqs} of "
        f"{runtime.generator.backend.max_seq} tokens: {engine.kv_bytes / 2**20:.0f} MiB"
        f"{', resident as rows fill' if backend == 'ort' else ''}; {hosts_answered(settings.allowed_hosts)})")
    config = uvicorn_config(app, host, port, settings.header_timeout_s)
    # uvicorn drains on SIGTERM, then raises the signal again under the handler it found: with this one in place
    # the process ends by returning, so a clean drain exits 0 (what process managers expect), not 143.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    # A script's background job starts with SIGINT ignored; uvicorn still drains on it, then raises it again under
    # that, and the process exited 0. Python's own handler makes it a KeyboardInterrupt: 130, as in a terminal.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    scheduler = app.state.scheduler
    try:
        draining_server(config, scheduler, shutdown_deadline_s).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        # A forced exit (a second Ctrl+C) skips the lifespan's stop. After the drain the engine is between steps,
        # unless one is stuck: the process then exits without waiting for it, and without closing the backend
        # under it (a native crash).
        if scheduler.stop():
            runtime.close()
    return scheduler.drained is not False


def uvicorn_config(app, host: str, port: int, header_timeout_s: float):
    """uvicorn's settings for ``app``: warnings only, and no access log. uvicorn's access log writes each request's
    path percent-decoded (``/%0d%0aINFO: ...`` as a line of its own, ``%1b`` as a terminal escape): it stays off
    whatever uvicorn's default level, so request text never reaches the server's log. ws="none": the API has no
    WebSocket route, so an upgrade is answered as HTTP whatever libraries are installed."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                          timeout_graceful_shutdown=RESPONSES_S, http=header_deadline_protocol(header_timeout_s),
                          ws="none")


def with_bound_hosts(settings: ServeSettings, bind_host: str) -> ServeSettings:
    """``settings`` with the host names answered decided by the address bound (`allowed_hosts_for`), unless they
    were given."""
    if settings.allowed_hosts is not None:
        return settings
    return dataclasses.replace(settings, allowed_hosts=allowed_hosts_for(bind_host))


def draining_server(config, scheduler, deadline_s: float):
    """A uvicorn server that, when told to stop, closes its listening sockets, then drains the scheduler
    (`Scheduler.drain`: requests on open connections get 503, admitted ones have ``deadline_s`` to finish, then end
    with a 503 or an error event), and only then lets uvicorn close the connections, waiting RESPONSES_S for the
    handlers' last bytes. uvicorn's own deadline would cancel the handlers instead: their clients got a bare 500 or a
    cut stream, and the drain that followed found nothing running."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            for server in self.servers:
                server.close()  # no new connections; uvicorn's shutdown closes them again (a no-op)
            for sock in sockets or []:
                sock.close()
            await scheduler.drain(deadline_s, abandon=lambda: self.force_exit)
            await super().shutdown(sockets)
            if self.force_exit:
                # uvicorn skips the app's shutdown on a second Ctrl+C: its lifespan task was then cancelled as the
                # loop closed, and Starlette printed that as an error with a traceback. It stops the engine now,
                # after at most the step under way (`Scheduler.stop`).
                await self.lifespan.shutdown()

    return DrainingServer(config)


def server_url(sock: socket.socket) -> str:
    """Where clients reach the bound socket: the port the system chose for --port 0, an IPv6 address in brackets."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` for uvicorn to serve on; InputError naming the cause when it cannot be
    (the port is taken, the address is not this machine's, the name does not resolve)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise InputError(f"--host {host!r}: cannot resolve it ({getattr(e, 'strerror', None) or e}): give an IP "
                         f"address such as 127.0.0.1") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port, or stop what "
                         f"uses it") from None
    sock.set_inheritable(True)
    return sock
