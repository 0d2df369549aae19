"""Bounded admission in front of N decode workers (threads; ONNX Runtime releases the GIL while it runs).

    sched = Scheduler(generator, workers=1, max_queue=8, timeout_s=300, metrics=m)
    request = sched.submit(job)           # ApiError 429 / 503 at once, before anything is awaited
    async for item in request.events():   # StreamEvent ..., then one Finished
        ...
    request.cancel()                      # the client went away: decoding stops at the next step

Admission counts every request from `submit` until its decoding has ended, under one lock: at most
``workers + max_queue`` are admitted at a time, however many arrive in the same instant, and each is counted
out exactly once, whether it finished, failed, was cancelled while waiting or running, or timed out. The
request's worker (not its consumer) records its metrics, so a request whose client vanished is still counted,
with ``finished_reason`` "abort" (or "timeout"). `drain` stops admission and waits for what is admitted.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator

from ..generator import GenerationResult, Generator, StreamEvent
from .metrics import RequestRecord, ServerMetrics
from .requests import ApiError, Job


@dataclass
class Finished:
    result: GenerationResult | None  # the whole result when decoding ended by itself (or was cut short: "abort")
    error: Exception | None = None  # the backend failed
    reason: str | None = None  # "timeout" | "abort" | "shutdown" when it was stopped from outside


class Request:
    """One admitted request: its events arrive on the event loop; `cancel` may be called from anywhere, any time."""

    def __init__(self, scheduler: "Scheduler", job: Job, loop: asyncio.AbstractEventLoop) -> None:
        self.scheduler, self.job, self.loop = scheduler, job, loop
        self.arrived = time.perf_counter()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stop = threading.Event()  # the worker checks it after every step
        self.stop_reason: str | None = None
        self.state = "waiting"  # -> "running" -> "done" (changed under the scheduler's lock)
        self.timer: asyncio.TimerHandle | None = None

    def put(self, item: StreamEvent | Finished) -> None:
        """Hand an item to the consumer (thread-safe)."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def cancel(self, reason: str = "abort") -> None:
        self.scheduler.cancel(self, reason)

    async def events(self) -> AsyncIterator[StreamEvent | Finished]:
        while True:
            item = await self.queue.get()
            yield item
            if isinstance(item, Finished):
                return


class Scheduler:
    def __init__(self, generator: Generator, workers: int, max_queue: int, timeout_s: float,
                 metrics: ServerMetrics) -> None:
        self.generator, self.workers, self.max_queue, self.timeout_s = generator, workers, max_queue, timeout_s
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="medusa-decode")
        self.lock = threading.Lock()
        self.waiting = self.running = 0
        self.accepting = True

    # ---- admission (event loop) -----------------------------------------------------------------------
    def submit(self, job: Job) -> Request:
        """Admit ``job`` or raise ApiError at once: 503 while shutting down, 429 when ``workers + max_queue``
        requests are already admitted."""
        with self.lock:
            if not self.accepting:
                refused = ("shutdown", ApiError(503, "the server is shutting down: retry on another replica",
                                                type_="server_error", headers={"Retry-After": "1"}))
            elif self.waiting + self.running >= self.workers + self.max_queue:
                refused = ("queue_full", ApiError(
                    429, f"the server is busy ({self.running} running, {self.waiting} waiting, queue limit "
                    f"{self.max_queue}): retry later", type_="rate_limit_error", headers={"Retry-After": "1"}))
            else:
                refused = None
                self.waiting += 1
        if refused:
            self.metrics.rejected.labels(**self.metrics.labels, reason=refused[0]).inc()
            raise refused[1]
        request = Request(self, job, asyncio.get_running_loop())
        self._gauges()
        request.timer = request.loop.call_later(self.timeout_s, request.cancel, "timeout")
        self.executor.submit(self._work, request)
        return request

    def cancel(self, request: Request, reason: str) -> None:
        """Stop ``request``: a waiting one is counted out at once, a running one after its current step."""
        with self.lock:
            if request.state == "done" or request.stop.is_set():
                return
            request.stop_reason = reason
            request.stop.set()
            was_waiting = request.state == "waiting"
            if was_waiting:
                request.state = "done"
                self.waiting -= 1
        if was_waiting:
            self._record(request, RequestRecord(len(request.job.prompt_ids), 0, 0.0, None, 0.0), reason)
            request.put(Finished(None, reason=reason))

    # ---- decoding (worker thread) ---------------------------------------------------------------------
    def _work(self, request: Request) -> None:
        with self.lock:
            if request.state != "waiting":
                return  # cancelled or timed out while it waited: already counted out
            request.state = "running"
            self.waiting -= 1
            self.running += 1
        started = time.perf_counter()
        self._gauges()
        rec = RequestRecord(len(request.job.prompt_ids), 0, started - request.arrived, None, 0.0)
        stream, error, last = None, None, None
        try:
            stream = self.generator.stream(request.job.prompt_ids, request.job.config)
            events = iter(stream)
            try:
                for event in events:
                    self.metrics.step()
                    last = _note_tokens(rec, request.arrived, last, len(event.token_ids))
                    request.put(event)
                    if request.stop.is_set():
                        break
            finally:
                events.close()  # ends the generator: its session (KV buffers) is released now
        except Exception as e:  # noqa: BLE001 - reported to this request; the worker and the server stay up
            error = e
        result = stream.result if stream is not None else None
        with self.lock:
            request.state = "done"
            self.running -= 1
        reason = request.stop_reason if request.stop.is_set() else None
        self._record(request, rec, reason or ("error" if error else None), result)
        request.put(Finished(result if error is None else None, error, reason))
        request.loop.call_soon_threadsafe(request.timer.cancel)

    def _record(self, request: Request, rec: RequestRecord, reason: str | None,
                result: GenerationResult | None = None) -> None:
        rec.e2e_s = time.perf_counter() - request.arrived
        if result is not None:
            rec.step_accepted, rec.draft_depth = result.step_accepted, result.draft_depth
        rec.finish_reason = reason or (result.finish_reason if result is not None else "abort")
        self.metrics.finished(rec)
        self._gauges()

    def _gauges(self) -> None:
        lab = self.metrics.labels
        self.metrics.waiting.labels(**lab).set(self.waiting)
        self.metrics.running.labels(**lab).set(self.running)

    # ---- shutdown -------------------------------------------------------------------------------------
    async def drain(self, deadline_s: float) -> bool:
        """Refuse new requests; wait up to ``deadline_s`` for the admitted ones. True when all of them ended."""
        with self.lock:
            self.accepting = False
        end = time.perf_counter() + deadline_s
        while (self.running or self.waiting) and time.perf_counter() < end:
            await asyncio.sleep(0.05)
        clean = not (self.running or self.waiting)
        self.executor.shutdown(wait=False, cancel_futures=True)
        return clean


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
