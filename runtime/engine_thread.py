"""An engine stepping on a thread of its own while there is work (the library's batcher, the server).

    thread = EngineThread(Engine(generator, max_num_seqs=8))
    seq = thread.submit(prompt_ids, GenerationConfig(max_new_tokens=64), sink)    # wakes it
    thread.stop()                                                                  # cancels what is left
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from .generation_config import GenerationConfig
from .engine import Engine, Sequence
from .errors import InputError, as_exception


class EngineThread:
    """An engine stepping on its own thread while there is work; `submit` wakes it (services, the server)."""

    def __init__(self, engine: Engine, name: str = "medusa-engine") -> None:
        self.engine = engine
        self.wake = threading.Event()
        self.stopping = False
        self.retiring = False  # stop once idle: the owner is gone, nothing more can be submitted
        self.left = False  # the loop has ended
        self.orphaned = False  # `stop` returned while a step still ran: the thread closes the engine after it
        self.submitting = threading.Lock()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def submit(self, prompt: str | list[int], cfg: GenerationConfig, sink: Callable) -> Sequence:
        with self.submitting:  # a request added after stop() would wait for a thread that is gone
            if self.stopping:
                raise InputError("this batcher is closed: open a new one (MedusaRuntime.batcher())")
            seq = self.engine.add(prompt, cfg, sink)
        self.wake.set()
        return seq

    def _loop(self) -> None:
        try:
            self._steps()
        finally:
            with self.submitting:
                self.left = True
            if self.orphaned:  # `stop` gave up waiting for the step that just ended: the engine is closed here
                self.engine.close()

    def _steps(self) -> None:
        failures = 0
        while not self.stopping:
            self.wake.wait()
            self.wake.clear()
            try:
                while not self.stopping and self.engine.step():
                    pass
                failures = 0
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # noqa: BLE001 - a bug outside the backend calls (or a native library's
                self.error = e  # panic, a BaseException): end the running requests, keep the thread for the next
                self.engine.fail(as_exception(e))
                failures += 1  # the requests still queued step soon, not at the next submit; a step that keeps
                time.sleep(min(0.001 * 2 ** failures, 1.0))  # failing is retried ever more slowly, never in a spin
                self.wake.set()
            if self.retiring and self.engine.idle and self._claim_stop():
                self.engine.close()  # its KV slots are freed now, not when the process ends

    def retire(self) -> None:
        """Stop once the requests already submitted have ended (their handles still get every event and result):
        what a `Batcher` dropped without `close` asks, so that its thread and KV slots do not outlive it."""
        self.retiring = True
        self.wake.set()

    def _claim_stop(self) -> bool:
        """Whether this call set ``stopping`` (the loop retiring itself), not `stop` before it. `stop` sets it too,
        then closes the engine again after the join: closing twice is harmless."""
        with self.submitting:
            mine, self.stopping = not self.stopping, True
        return mine

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop after the current step and close the engine (cancelling what is left); False when that step
        outlasted ``timeout``: the thread then closes the engine once the step ends. Closing it under a running
        step would free the sessions the backend is computing with (a native crash at shutdown)."""
        with self.submitting:
            self.stopping = True
        self.wake.set()
        self.thread.join(timeout)
        with self.submitting:  # exactly one of the two closes it after the step: here, or the thread as it leaves
            # once handed to the thread it stays there: a second `stop` (the lifespan's, then `run_server`'s) that
            # found the step ended would close it again beside the thread, and the backend under that close
            self.orphaned = self.orphaned or not self.left
        if not self.orphaned:
            self.engine.close()
        return not self.orphaned
