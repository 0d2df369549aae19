"""Bounded admission in front of N decode workers (threads; ONNX Runtime releases the GIL while it runs).

    sched = Scheduler(generator, workers=1, max_queue=8, timeout_s=300, metrics=m)
    async for event in sched.run(job):       # StreamEvent ..., then Finished
        ...

A request waits for a free worker; when all workers are busy and ``max_queue`` requests already wait, it is
refused at once (`ApiError` 429 with ``Retry-After``). A consumer that stops iterating (a client that
disconnected) or runs past ``timeout_s`` cancels its decoding at the next step. `drain` stops admission and
waits for the running requests up to a deadline (graceful shutdown).
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
    result: GenerationResult | None  # None when cancelled (disconnect, timeout, shutdown)


class Scheduler:
    def __init__(self, generator: Generator, workers: int, max_queue: int, timeout_s: float,
                 metrics: ServerMetrics) -> None:
        self.generator, self.workers, self.max_queue, self.timeout_s = generator, workers, max_queue, timeout_s
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="medusa-decode")
        self.slots: asyncio.Semaphore | None = None  # made on the server's event loop
        self.waiting = self.running = 0
        self.accepting = True

    async def run(self, job: Job) -> AsyncIterator[StreamEvent | Finished]:
        if not self.accepting:
            self._reject("shutdown")
            raise ApiError(503, "the server is shutting down: retry on another replica", type_="server_error",
                           headers={"Retry-After": "1"})
        self.slots = self.slots or asyncio.Semaphore(self.workers)
        if self.slots.locked() and self.waiting >= self.max_queue:
            self._reject("queue_full")
            raise ApiError(429, f"the server is busy ({self.running} running, {self.waiting} waiting, queue limit "
                           f"{self.max_queue}): retry later", type_="rate_limit_error", headers={"Retry-After": "1"})
        arrived = time.perf_counter()
        self._count(waiting=+1)
        try:
            await asyncio.wait_for(self.slots.acquire(), timeout=self.timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(503, f"no decode worker became free within {self.timeout_s:g} s: retry later",
                           type_="server_error", headers={"Retry-After": "1"}) from None
        finally:
            self._count(waiting=-1)
        self._count(running=+1)
        try:
            async for item in self._decode(job, arrived, time.perf_counter()):
                yield item
        finally:
            self._count(running=-1)
            self.slots.release()

    async def _decode(self, job: Job, arrived: float, started: float) -> AsyncIterator[StreamEvent | Finished]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        deadline = arrived + self.timeout_s
        future = loop.run_in_executor(self.executor, self._work, job, queue, loop, cancel)
        rec = RequestRecord(len(job.prompt_ids), 0, started - arrived, None, 0.0)
        last, timed_out, result = None, False, None
        try:
            while True:
                try:
                    kind, item = await asyncio.wait_for(queue.get(), timeout=max(deadline - time.perf_counter(), 0))
                except asyncio.TimeoutError:
                    timed_out = True
                    break
                if kind == "done":
                    result = item
                    break
                now = time.perf_counter()
                n = len(item.token_ids)
                if n:
                    if rec.ttft_s is None:
                        rec.ttft_s = now - arrived
                    elif last is not None:
                        rec.token_gaps_s += [(now - last) / n] * n
                    last = now
                    rec.generation_tokens += n
                yield item
        finally:
            cancel.set()  # a consumer that stopped early (disconnect) or ran out of time ends the decoding
            await asyncio.shield(future)
            rec.e2e_s = time.perf_counter() - arrived
            if isinstance(result, GenerationResult):
                rec.step_accepted, rec.draft_depth = result.step_accepted, result.draft_depth
                rec.finish_reason = result.finish_reason
            else:
                rec.finish_reason = "timeout" if timed_out else "error" if result is not None else "abort"
            self.metrics.finished(rec)
        if isinstance(result, Exception):
            raise ApiError(500, f"decoding failed: {type(result).__name__}: {str(result)[:200]}",
                           type_="server_error") from result
        yield Finished(result)

    def _work(self, job: Job, queue: asyncio.Queue, loop: asyncio.AbstractEventLoop, cancel: threading.Event) -> None:
        """On a worker thread: decode, handing each step's event to the event loop; stop when cancelled."""
        put = lambda kind, item: loop.call_soon_threadsafe(queue.put_nowait, (kind, item))  # noqa: E731
        stream = self.generator.stream(job.prompt_ids, job.config)
        events = iter(stream)
        try:
            for event in events:
                self.metrics.step()
                put("event", event)
                if cancel.is_set():
                    break
        except Exception as e:  # noqa: BLE001 - reported to the request, the worker stays up
            put("done", e)
            return
        finally:
            events.close()  # ends the generator: its session (KV buffers) is released now
        put("done", stream.result if not cancel.is_set() else None)

    async def drain(self, deadline_s: float) -> None:
        """Refuse new requests; wait up to ``deadline_s`` for running and waiting ones."""
        self.accepting = False
        end = time.perf_counter() + deadline_s
        while (self.running or self.waiting) and time.perf_counter() < end:
            await asyncio.sleep(0.05)
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _count(self, waiting: int = 0, running: int = 0) -> None:
        self.waiting += waiting
        self.running += running
        lab = self.metrics.labels
        self.metrics.waiting.labels(**lab).set(self.waiting)
        self.metrics.running.labels(**lab).set(self.running)

    def _reject(self, reason: str) -> None:
        self.metrics.rejected.labels(**self.metrics.labels, reason=reason).inc()
