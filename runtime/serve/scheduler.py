"""Admission and request lifetimes in front of the batched engine (`runtime.engine`), which decodes every running
request together on one thread (ONNX Runtime releases the GIL while it runs).

    sched = Scheduler(generator, max_num_seqs=8, max_num_batched_tokens=64, max_queue=8, timeout_s=300, metrics=m)
    request = sched.submit(job)           # ApiError 429 / 503 at once, before anything is awaited
    async for item in request.events():   # StreamEvent ..., then one Finished
        ...
    request.cancel()                      # the client went away: its sequence leaves the batch at the next step

Admission counts every request from `submit` until the engine has handed back its result, under one lock: at
most ``max_num_seqs`` run and ``max_queue`` wait, however many arrive in the same instant, and each is counted out
exactly once, whether it finished, failed, was cancelled or timed out. The engine (not the consumer) reports each
request's end, so a request whose client vanished is still recorded, with ``finished_reason`` "abort" (or
"timeout", or "shutdown"). `drain` stops admission, waits for what is admitted, and past its deadline cancels it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from ..engine import Engine, Sequence, StepRecord
from ..engine_thread import EngineThread
from ..generator import GenerationResult, Generator
from ..text_output import StreamEvent
from .metrics import RequestRecord, ServerMetrics
from .requests import ApiError, Job


# After the shutdown deadline, how long the requests then cancelled get to end: the engine hands them back after its
# current step (a prompt chunk with a lanes graph; a whole prompt without one), and their handlers answer 503 or send
# an error event. A shutdown therefore takes up to --shutdown-timeout + this + `server.RESPONSES_S` + STOP_S.
SHUTDOWN_CANCEL_S = 10.0
# Then, for the engine's current step to end before the engine is closed. Only a step stuck past the drain takes
# that long: the process then exits without it (the thread is a daemon) instead of waiting more.
STOP_S = 5.0


@dataclass
class Finished:
    result: GenerationResult | None  # the whole result (also when cut short: finish_reason "abort", "timeout", ...)
    error: Exception | None = None  # the backend failed
    reason: str | None = None  # "timeout" | "abort" | "shutdown" when it was stopped from outside


class Request:
    """One admitted request: its events arrive on the event loop; `cancel` may be called from anywhere, any time."""

    def __init__(self, scheduler: "Scheduler", job: Job, loop: asyncio.AbstractEventLoop) -> None:
        self.scheduler, self.job, self.loop = scheduler, job, loop
        self.arrived = time.perf_counter()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.record = RequestRecord(len(job.prompt_ids), 0, 0.0, None, 0.0)
        self.last_token: float | None = None
        self.sequence: Sequence | None = None
        self.stop_reason: str | None = None
        self.timer: asyncio.TimerHandle | None = None

    def cancel(self, reason: str = "abort") -> None:
        """Stop it: one still queued ends now, one running at the engine's next step."""
        if self.stop_reason is None:
            self.stop_reason = reason
            if self.sequence is not None:  # else `submit` passes it on once the engine has the request
                self.scheduler.engine.cancel(self.sequence, reason)
                self.scheduler.withdraw(self)

    async def events(self) -> AsyncIterator[StreamEvent | Finished]:
        while True:
            item = await self.queue.get()
            yield item
            if isinstance(item, Finished):
                return


class Scheduler:
    def __init__(self, generator: Generator, max_num_seqs: int | None, max_num_batched_tokens: int, max_queue: int,
                 timeout_s: float, metrics: ServerMetrics, prefix_caching: bool = True,
                 on_finished: Callable[[str, int, RequestRecord], None] | None = None) -> None:
        self.max_queue, self.timeout_s, self.metrics = max_queue, timeout_s, metrics
        self.on_finished = on_finished  # (request id, choice, record) of each answer that ends: the request log
        self.engine = Engine(generator, max_num_seqs, max_num_batched_tokens, on_step=self._on_step,
                             reuse_prefixes=prefix_caching)
        self.max_num_seqs = self.engine.max_num_seqs
        self.thread = EngineThread(self.engine)
        self.lock = threading.Lock()
        self.admitted = 0
        self.accepting = True
        self.live: set[Request] = set()  # admitted and not yet finished: what a shutdown past its deadline cancels
        self.drained: bool | None = None  # the drain's outcome, once it ran

    @property
    def running(self) -> int:
        return len(self.engine.running)

    @property
    def waiting(self) -> int:
        return self.admitted - self.running

    def submit(self, job: Job) -> Request:
        """Admit ``job`` or raise ApiError at once: 503 while shutting down, 429 when ``max_num_seqs + max_queue``
        requests are already admitted."""
        return self.submit_all([job])[0]

    def submit_all(self, jobs: list[Job], param: str = "n") -> list[Request]:
        """Admit every job or none (a request's answers: its prompts times n), or raise ApiError at once: 400 (naming
        ``param``) for more jobs than the server ever admits together, 503 while shutting down, 429 when they do not
        fit beside those admitted."""
        room = self.max_num_seqs + self.max_queue
        if len(jobs) > room:
            raise ApiError(400, f"the request asks for {len(jobs)} answers (its prompts times n), more than this server "
                           f"admits at once ({room}: --max-num-seqs {self.max_num_seqs} plus --max-queue "
                           f"{self.max_queue}): ask for fewer", param=param)
        with self.lock:
            if not self.accepting:
                refused = ("shutdown", ApiError(503, "the server is shutting down: retry on another replica",
                                                type_="server_error", headers={"Retry-After": "1"}))
            elif self.admitted + len(jobs) > room:
                refused = ("queue_full", ApiError(
                    429, f"the server is busy ({self.admitted} requests admitted: {self.max_num_seqs} decode together "
                    f"and {self.max_queue} may wait{_places(len(jobs), room - self.admitted)}): retry later",
                    type_="rate_limit_error",
                    headers={"Retry-After": "1"}))
            else:
                refused = None
                self.admitted += len(jobs)
        if refused:
            self.metrics.rejected.labels(**self.metrics.labels, reason=refused[0]).inc()
            raise refused[1]
        requests = [Request(self, job, asyncio.get_running_loop()) for job in jobs]
        for i, request in enumerate(requests):
            try:
                self._start(request)
            except Exception:
                for later in requests[i + 1:]:  # admitted above, never started: handed back
                    self._count_out(later)
                cancel_all(requests[:i])
                raise
        self._gauges()
        return requests

    def _start(self, request: Request) -> None:
        request.timer = request.loop.call_later(self.timeout_s, request.cancel, "timeout")
        with self.lock:
            self.live.add(request)
        try:  # the engine thread may report on it before `submit` returns: everything it reads is set already
            request.sequence = self.thread.submit(request.job.prompt_ids, request.job.config,
                                                  lambda item: self._sink(request, item))
            if request.stop_reason:
                self.engine.cancel(request.sequence, request.stop_reason)
        except Exception:
            request.timer.cancel()
            self._count_out(request)
            raise

    def withdraw(self, request: Request) -> None:
        """Hand back ``request``, cancelled, if it is still in the engine's queue. The engine would drop it at its
        next step, which may be a whole long prompt's prefill away: meanwhile its client waited for its 504 past
        --request-timeout, a vanished client's place kept new requests at 429, and a shutdown's queued requests
        outlived SHUTDOWN_CANCEL_S. It holds no KV slot, so nothing on the engine thread needs it."""
        if request.sequence is not None:
            self.engine.withdraw(request.sequence)

    # ---- on the engine thread ---------------------------------------------------------------------------
    def _sink(self, request: Request, item) -> None:
        rec, now = request.record, time.perf_counter()
        if isinstance(item, StreamEvent):
            if rec.ttft_s is None:
                rec.queue_s = (_admitted_at(request) or now) - request.arrived
            # echo with max_tokens 0 decodes one token the answer never holds: not generated, no first token
            generated = len(item.token_ids) if request.job.answer else 0
            request.last_token = _note_tokens(rec, request.arrived, request.last_token, generated)
            if not _deliver(request, request.queue.put_nowait, item) and request.sequence is not None:
                self.engine.cancel(request.sequence, "abort")  # no one is left to read it: stop decoding it
            return
        error = item if isinstance(item, Exception) else None
        result = item if isinstance(item, GenerationResult) else None
        rec.e2e_s = now - request.arrived
        if rec.ttft_s is None:
            rec.queue_s = (_admitted_at(request) or now) - request.arrived
        if result is not None:
            rec.step_accepted, rec.draft_depth, rec.finish_reason = (result.step_accepted, result.draft_depth,
                                                                     result.finish_reason)
            rec.cached_tokens = result.cached_tokens
        else:
            rec.finish_reason = "error"
        self.metrics.finished(rec)
        self._count_out(request)
        if _deliver(request, request.queue.put_nowait, Finished(result, error, request.stop_reason)):
            _deliver(request, request.timer.cancel)
        if self.on_finished is not None:  # after the answer is on its way and the place freed
            try:
                self.on_finished(request.job.request_id, request.job.choice, rec)
            except Exception:  # noqa: BLE001 - a host's logging filter that fails must not fail the engine's step
                pass

    def _on_step(self, step: StepRecord) -> None:
        self.metrics.step(step.sequences, step.speculative)
        self._gauges()

    def _count_out(self, request: Request) -> None:
        with self.lock:  # one section: a drain never sees a request admitted but no longer live
            self.live.discard(request)
            self.admitted -= 1
        self._gauges()

    def _gauges(self) -> None:
        lab = self.metrics.labels
        self.metrics.running.labels(**lab).set(self.running)
        self.metrics.waiting.labels(**lab).set(max(self.waiting, 0))

    # ---- shutdown -------------------------------------------------------------------------------------
    async def drain(self, deadline_s: float, abandon: Callable[[], bool] = lambda: False) -> bool:
        """Refuse new requests (503) and wait up to ``deadline_s`` for the admitted ones; past it, cancel what is
        still running or queued (each ends with finish reason "shutdown": a 503, or an error event in its stream)
        and wait up to SHUTDOWN_CANCEL_S for the engine to hand them back. True when all of them ended by
        themselves. Runs once; a later call returns the first one's outcome. ``abandon``: stop waiting at once
        (a second Ctrl+C)."""
        if self.drained is not None:
            return self.drained
        with self.lock:
            self.accepting = False
        await self._wait_admitted(deadline_s, abandon)
        clean = not self.admitted
        if not clean:
            with self.lock:
                pending = list(self.live)
            for request in pending:
                request.cancel("shutdown")
            self.thread.wake.set()  # running ones leave at its next step (queued ones left in `cancel`)
            await self._wait_admitted(SHUTDOWN_CANCEL_S, abandon)
        self.drained = clean
        return clean

    async def _wait_admitted(self, seconds: float, abandon: Callable[[], bool]) -> None:
        end = time.perf_counter() + seconds
        while self.admitted and time.perf_counter() < end and not abandon():
            await asyncio.sleep(0.05)

    def stop(self, timeout_s: float = STOP_S) -> bool:
        """The engine thread ends (after `drain`: what is still running is cancelled); False when its current step
        outlasted ``timeout_s`` (the backend is still computing: it must not be closed under it)."""
        return self.thread.stop(timeout_s)


def cancel_all(requests: list[Request], reason: str = "abort") -> None:
    """Stop every one of a request's choices (`Request.cancel`: a no-op for one that finished)."""
    for request in requests:
        request.cancel(reason)


def _places(needed: int, free: int) -> str:
    """What a request of several answers lacks: ``free`` places may be more than none."""
    return f"; this request's {needed} answers need {needed} places, {free} are free" if needed > 1 else ""


def _deliver(request: Request, call: Callable, *args) -> bool:
    """``call(*args)`` soon on the request's event loop, from the engine thread; False when that loop has closed
    (a forced shutdown ended it with the request still admitted): raising there would fail the engine's step for
    every other request, or `Scheduler.stop` for the caller."""
    try:
        request.loop.call_soon_threadsafe(call, *args)
        return True
    except RuntimeError:  # 'Event loop is closed': its handler is gone, nothing awaits this
        return False


def _admitted_at(request: Request) -> float | None:
    return request.sequence.admitted_at if request.sequence is not None else None


def _note_tokens(rec: RequestRecord, arrived: float, last: float | None, n: int) -> float | None:
    """Time to first token, and each later token's share of its step's time."""
    if not n:
        return last
    now = time.perf_counter()
    if rec.ttft_s is None:
        rec.ttft_s = now - arrived
    elif last is not None:
        rec.token_gaps_s += [(now - last) / n] * n
    rec.generation_tokens += n
    return now
