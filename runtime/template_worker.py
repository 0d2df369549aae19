"""Chat templates rendered in worker processes: the operating system bounds what a template can take. A template is
code an artifact carries; in the host process, checks on its operators and arguments (`template_limits`) can be
walked around (string joins with ``~``, block captures, ``replace``), so a worker runs under an address-space limit
(``MEMORY_BYTES`` above what it holds at start: a template that builds gigabytes gets a MemoryError there) and is
killed when a call takes longer than ``template_limits.MAX_RENDER_S`` per render (a new one starts for the next
call). A worker also ends itself past twice that (an alarm: its host may be gone) and at the end of its input, and
offers itself first to the kernel's out-of-memory killer.

    workers = shared_worker()                                  # this process's pool, started at first use
    texts = workers.render(source, "<s>", "</s>", [(messages, True), (marked, True)])

Renders run on a pool of ``POOL_SIZE`` workers; one waits at most ``WAIT_S`` for a free worker (BusyError then),
so a template that spends its time on some requests delays others by at most that, never without bound.

Errors: TemplateSyntax (the source does not compile), InputError (the template's ``raise_exception``, or messages
that are not JSON values), TemplateLimitError (time, memory, size), TemplateRenderFailure (anything else it
raised), BusyError, WorkerUnavailable (no worker can start: the caller renders in its own process). Where no worker
can start at all (no ``sys.executable``, a sandbox that forbids processes) `shared_worker` returns None.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import queue
import select
import struct
import subprocess
import sys
import threading
import time

from .errors import BusyError, InputError
from .template_limits import MAX_OUTPUT, MAX_RENDER_S, TemplateLimitError

MEMORY_BYTES = 1 << 30  # address space a render may add to the worker
POOL_SIZE = 2  # workers per process: a slow render holds one
WAIT_S = 2 * MAX_RENDER_S + 1  # for a free worker: one chat call's whole budget (two renders), then BusyError
START_TIMEOUT_S = 60.0  # a fresh interpreter importing jinja2, on a loaded machine
MAX_FRAME = 12 * MAX_OUTPUT + (1 << 20)  # one reply: two renders of MAX_OUTPUT characters, each at most 6 bytes
# as JSON (a control character's \u0001)
READY = "medusa-export template worker 1"
_HEADER = struct.Struct(">Q")
_PATH_ENV = "MEDUSA_EXPORT_WORKER_PATH"  # the host's sys.path, so the worker imports the same package copy
_BOOT = (f"import json, os, resource, signal, sys; sys.path[:] = json.loads(os.environ[{_PATH_ENV!r}]); "
         "from medusa_export.runtime.template_worker import serve; serve()")  # the limits' modules: before the path


class TemplateSyntax(Exception):
    """The template does not compile (its message and line)."""

    def __init__(self, message: str, lineno: int | None) -> None:
        super().__init__(message)
        self.lineno = lineno  # jinja2.TemplateSyntaxError's name for it


class TemplateRenderFailure(Exception):
    """The template raised while rendering (its exception's type and message)."""


class WorkerUnavailable(OSError):
    """No worker process could be started for this render."""


class TemplateWorker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._ids = itertools.count(1)

    def render(self, source: str, bos: str, eos: str, calls: list[tuple[list[dict], bool]]) -> list[str]:
        """Each ``(messages, add_generation_prompt)`` rendered by ``source``, within the time and memory bounds."""
        with self._lock:
            rid = next(self._ids)
            data = _encoded({"id": rid, "source": source, "bos": bos, "eos": eos, "calls": [[m, g] for m, g in calls]})
            proc = self._started()
            budget = MAX_RENDER_S * max(len(calls), 1)
            try:
                _send(proc.stdin, data)
                reply = _receive(proc.stdout, budget)
            except TimeoutError:
                self._stop()
                raise TemplateLimitError(f"the template ran for more than {budget:g} s") from None
            except (OSError, EOFError, ValueError):  # it died (out of memory, a crash) or wrote no frame of ours
                self._stop()
                raise TemplateLimitError("the template's render ended its worker process (out of memory?)") from None
            except BaseException:  # interrupted mid-call (Ctrl-C, a host MemoryError): its reply may still come,
                self._stop()  # and would answer the next call; a new worker starts instead
                raise
            if reply.get("id") != rid:  # a frame of another call: never hand it on
                self._stop()
                raise TemplateLimitError("the template worker answered out of turn; it was restarted")
        return _result(reply)

    def start(self) -> None:
        """Start the process now (WorkerUnavailable where none can), not at the first render."""
        with self._lock:
            self._started()

    def _started(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._stop()
            try:  # -P and no working directory on the path: nothing there shadows a module the worker imports
                env = {**os.environ, _PATH_ENV: json.dumps(_worker_path())}
                self._proc = subprocess.Popen([sys.executable, "-P", "-c", _BOOT], stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
                if _receive(self._proc.stdout, START_TIMEOUT_S).get("ready") != READY:
                    raise ValueError("not a worker")
            except Exception as e:  # noqa: BLE001 - OSError, ValueError, EOFError, TimeoutError, MemoryError, ...
                self._stop()
                raise WorkerUnavailable(f"the chat template worker did not start ({type(e).__name__})") from None
            except BaseException:  # interrupted during the handshake: its ready frame must not answer a call
                self._stop()
                raise
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


def _worker_path() -> list[str]:
    """The host's import path as text, without the entries that stand for the working directory."""
    here = os.getcwd()
    return [os.fspath(p) for p in sys.path if isinstance(p, (str, os.PathLike))
            and os.fspath(p) not in ("", ".") and os.path.abspath(os.fspath(p)) != here]


class TemplatePool:
    """``size`` workers (the first started now, the others at first need); a render takes a free one."""

    def __init__(self, size: int = POOL_SIZE) -> None:
        self.pid = os.getpid()  # a forked child gets a pool of its own (`ChatTemplate` checks)
        self.workers = [TemplateWorker() for _ in range(size)]
        self.workers[0].start()  # WorkerUnavailable where no process can start
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
            except Exception:  # noqa: BLE001 - WorkerUnavailable, or anything a broken interpreter does
                _unavailable = True
                return None
            _shared = pool
            atexit.register(pool.close)
        return _shared


def _after_fork_in_child() -> None:
    """A forked child owns neither the parent's workers nor its locks (one may have been held at the fork)."""
    global _shared, _unavailable, _shared_lock
    _shared, _unavailable, _shared_lock = None, False, threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


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


def _encoded(value: dict) -> bytes:
    """A frame's payload: JSON in UTF-8 (lone surrogates kept as they are: surrogatepass); InputError for values
    that are not JSON (messages given by a library caller)."""
    try:
        return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError) as e:
        raise InputError(f"chat messages must be JSON values (strings, numbers, lists, objects): {e}") from None


def _decoded(payload: bytes | bytearray) -> dict:
    value = json.loads(payload.decode("utf-8", "surrogatepass"))
    if not isinstance(value, dict):
        raise ValueError("a frame that is not a JSON object")
    return value


def _send(pipe, data: bytes) -> None:
    pipe.write(_HEADER.pack(len(data)) + data)
    pipe.flush()


def _receive(pipe, timeout_s: float) -> dict:
    """One frame, waiting at most ``timeout_s`` for all of it (TimeoutError); ValueError for a length no frame of
    ours has (another program's output). Read into one buffer: appending to bytes copied it all per chunk."""
    deadline = time.monotonic() + timeout_s
    fd = pipe.fileno()
    header = _read_exactly(fd, _HEADER.size, deadline)
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ValueError(f"a frame of {length} bytes")
    return _decoded(_read_exactly(fd, length, deadline))


def _read_exactly(fd: int, n: int, deadline: float) -> bytearray:
    buf, got = bytearray(n), 0
    view = memoryview(buf)
    poller = select.poll()  # not select.select, which refuses descriptors past 1,023 (a busy server has them)
    poller.register(fd, select.POLLIN)
    while got < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(remaining * 1000):
            raise TimeoutError
        count = os.readv(fd, [view[got:]])
        if not count:
            raise EOFError
        got += count
    return buf


# ------------------------------------------------------------------------------------------------- the worker side
def serve() -> None:
    """The worker's loop: one request in, one reply out, until its input closes."""
    _limit_memory()
    _offer_to_the_oom_killer()
    from .chat_template import NO_TOOLS, environment
    from .template_limits import bounded_render

    env, compiled = environment(), {}
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but frames on the pipe the host reads
    _send(stdout, json.dumps({"ready": READY}).encode())
    while header := stdin.read(_HEADER.size):
        request = _decoded(stdin.read(_HEADER.unpack(header)[0]))
        calls = request["calls"]
        _alarm(2 * MAX_RENDER_S * max(len(calls), 1))  # the host kills it at the budget; this, if the host is gone
        try:
            template = compiled.get(request["source"])
            if template is None:
                template = env.from_string(request["source"])
                compiled = {request["source"]: template}  # one template per artifact: keep the last
            reply = {"ok": [bounded_render(template, trace=False, messages=m, add_generation_prompt=g,
                                           bos_token=request["bos"], eos_token=request["eos"], **NO_TOOLS)
                               for m, g in calls]}
        except InputError as e:
            reply = {"refused": str(e)}
        except TemplateLimitError as e:
            reply = {"limit": str(e)}
        except MemoryError:
            reply = {"limit": f"the template needed more than {MEMORY_BYTES >> 20} MiB"}
        except Exception as e:  # noqa: BLE001 - the template is code: report what it raised
            from jinja2 import TemplateSyntaxError

            if isinstance(e, TemplateSyntaxError):
                reply = {"syntax": " ".join(str(getattr(e, "message", None) or e).split())[:300],
                         "line": getattr(e, "lineno", None)}
            else:
                reply = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
        _alarm(0)
        reply["id"] = request["id"]
        _send(stdout, json.dumps(reply, ensure_ascii=False).encode("utf-8", "surrogatepass"))


def _alarm(seconds: float) -> None:
    """SIGALRM's default action ends the process: a render its host no longer waits for cannot spin on."""
    try:
        import signal

        signal.setitimer(signal.ITIMER_REAL, seconds)
    except (ImportError, AttributeError, OSError):
        pass


def _offer_to_the_oom_killer() -> None:
    """Linux: the out-of-memory killer's first choice, before the host. (No PR_SET_PDEATHSIG: it fires when the
    spawning *thread* ends, and a server's pool threads come and go; an orphan ends at its alarm or at the EOF of
    its input instead.)"""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def _limit_memory() -> None:
    """Address space: what the worker holds now plus MEMORY_BYTES (best effort: not every system has the limit)."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            held = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (held + MEMORY_BYTES, held + MEMORY_BYTES))
    except (ImportError, OSError, ValueError):
        pass
