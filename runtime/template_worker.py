"""Chat templates rendered in a worker process: the operating system bounds what a template can take. A template is
code an artifact carries; in the host process, checks on its operators and arguments (`template_limits`) can be
walked around (string joins with ``~``, block captures, ``replace``), so the worker runs under an address-space
limit (``MEMORY_BYTES`` above what it holds at start: a template that builds gigabytes gets a MemoryError there) and
is killed when a render takes longer than ``template_limits.MAX_RENDER_S`` (a new one starts at the next render).

    workers = shared_worker()                                  # this process's pool, started at first use
    texts = workers.render(source, "<s>", "</s>", [(messages, True), (marked, True)])

Renders run on a pool of ``POOL_SIZE`` workers; one waits at most ``WAIT_S`` for a free worker (BusyError then),
so a template that spends its 2 s on some requests delays others by at most that, never without bound.

Errors: TemplateSyntax (the source does not compile), InputError (the template's ``raise_exception``),
TemplateLimitError (time, memory, size), TemplateRenderFailure (anything else it raised), BusyError. Where no worker can be
started (no ``sys.executable``, a sandbox that forbids processes) `shared_worker` returns None and templates render
in the host process with `template_limits`' checks alone.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import select
import struct
import subprocess
import sys
import threading

from .errors import BusyError, InputError
from .template_limits import MAX_RENDER_S, TemplateLimitError

MEMORY_BYTES = 1 << 30  # address space a render may add to the worker
POOL_SIZE = 2  # workers per process: a slow render holds one
WAIT_S = 2 * MAX_RENDER_S  # for a free worker: two slow renders in turn, then BusyError
START_TIMEOUT_S = 60.0  # a fresh interpreter importing jinja2, on a loaded machine
_HEADER = struct.Struct(">Q")


class TemplateSyntax(Exception):
    """The template does not compile (its message and line)."""

    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.line = line


class TemplateRenderFailure(Exception):
    """The template raised while rendering (its exception's type and message)."""


class TemplateWorker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def render(self, source: str, bos: str, eos: str, calls: list[tuple[list[dict], bool]]) -> list[str]:
        """Each ``(messages, add_generation_prompt)`` rendered by ``source``, within the time and memory bounds."""
        request = {"source": source, "bos": bos, "eos": eos, "calls": [[m, g] for m, g in calls]}
        with self._lock:
            proc = self._started()
            try:
                _write(proc.stdin, request)
                reply = _read(proc.stdout, MAX_RENDER_S)
            except TimeoutError:
                self._stop()
                raise TemplateLimitError(f"the template ran for more than {MAX_RENDER_S:g} s") from None
            except (OSError, EOFError, ValueError):  # it died (the kernel's OOM killer, a crash)
                self._stop()
                raise TemplateLimitError("the template's render ended its worker process (out of memory?)") from None
        return _result(reply)

    def _started(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, "-c", "from medusa_export.runtime.template_worker import "
                                           "serve; serve()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL)
            try:
                if _read(self._proc.stdout, START_TIMEOUT_S) != {"ready": True}:
                    raise EOFError
            except (TimeoutError, OSError, EOFError, ValueError):
                self._stop()
                raise OSError("the chat template worker did not start") from None
        return self._proc

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout):
                pipe.close()
            self._proc = None

    def close(self) -> None:
        with self._lock:
            self._stop()


class TemplatePool:
    """``size`` workers (the first started now, the others at first need); a render takes a free one."""

    def __init__(self, size: int = POOL_SIZE) -> None:
        self.workers = [TemplateWorker() for _ in range(size)]
        with self.workers[0]._lock:
            self.workers[0]._started()  # OSError where no process can start: the caller renders in-process
        self.free: queue.Queue[TemplateWorker] = queue.Queue()
        for worker in self.workers:
            self.free.put(worker)

    def render(self, source: str, bos: str, eos: str, calls: list[tuple[list[dict], bool]]) -> list[str]:
        try:
            worker = self.free.get(timeout=WAIT_S)
        except queue.Empty:
            raise BusyError(f"every chat template worker stayed busy for {WAIT_S:g} s (slow renders of other "
                            f"requests): retry") from None
        try:
            return worker.render(source, bos, eos, calls)
        finally:
            self.free.put(worker)

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


_shared: TemplatePool | None = None
_unavailable = False
_shared_lock = threading.Lock()


def shared_worker() -> TemplatePool | None:
    """This process's pool of workers (started now if need be), or None where no worker can run."""
    global _shared, _unavailable
    with _shared_lock:
        if _shared is None and not _unavailable:
            try:
                pool = TemplatePool()
            except OSError:
                _unavailable = True
                return None
            _shared = pool
            atexit.register(pool.close)
        return _shared


def _result(reply: dict) -> list[str]:
    if "ok" in reply:
        return reply["ok"]
    if "syntax" in reply:
        raise TemplateSyntax(reply["syntax"], reply.get("line"))
    if "refused" in reply:
        raise InputError(reply["refused"])
    if "limit" in reply:
        raise TemplateLimitError(reply["limit"])
    raise TemplateRenderFailure(reply.get("error", "unknown error"))


def _write(pipe, value: dict) -> None:
    data = json.dumps(value).encode()  # ASCII: lone surrogates travel as escapes
    pipe.write(_HEADER.pack(len(data)) + data)
    pipe.flush()


def _read(pipe, timeout_s: float) -> dict:
    """One frame, waiting at most ``timeout_s`` for all of it (TimeoutError)."""
    import time

    deadline = time.monotonic() + timeout_s
    fd, data, need = pipe.fileno(), b"", _HEADER.size
    while len(data) < need:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise TimeoutError
        chunk = os.read(fd, max(need - len(data), 1 << 16))
        if not chunk:
            raise EOFError
        data += chunk
        if need == _HEADER.size and len(data) >= need:
            need += _HEADER.unpack(data[:_HEADER.size])[0]
    return json.loads(data[_HEADER.size:need])


# ------------------------------------------------------------------------------------------------- the worker side
def serve() -> None:
    """The worker's loop: one request in, one reply out, until its input closes."""
    _limit_memory()
    from .chat_template import environment
    from .template_limits import bounded_render

    env, compiled = environment(), {}
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    _write(stdout, {"ready": True})
    while header := stdin.read(_HEADER.size):
        request = json.loads(stdin.read(_HEADER.unpack(header)[0]))
        try:
            template = compiled.get(request["source"])
            if template is None:
                template = env.from_string(request["source"])
                compiled = {request["source"]: template}  # one template per artifact: keep the last
            reply = {"ok": [bounded_render(template, trace=False, messages=m, add_generation_prompt=g,
                                           bos_token=request["bos"], eos_token=request["eos"])
                            for m, g in request["calls"]]}
        except InputError as e:
            reply = {"refused": str(e)}
        except TemplateLimitError as e:
            reply = {"limit": str(e)}
        except MemoryError:
            reply = {"limit": f"the template needed more than {MEMORY_BYTES >> 20} MiB"}
        except Exception as e:  # noqa: BLE001 - the template is code: report what it raised
            from jinja2 import TemplateSyntaxError

            if isinstance(e, TemplateSyntaxError) or type(e).__name__ == "TemplateAssertionError":
                reply = {"syntax": " ".join(str(getattr(e, "message", None) or e).split())[:300],
                         "line": getattr(e, "lineno", None)}
            else:
                reply = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
        _write(stdout, reply)


def _limit_memory() -> None:
    """Address space: what the worker holds now plus MEMORY_BYTES (best effort: not every system has the limit)."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            held = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (held + MEMORY_BYTES, held + MEMORY_BYTES))
    except (ImportError, OSError, ValueError):
        pass
