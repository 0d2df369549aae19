"""Many requests decoded together, from a service's own threads: the batched engine on a thread of its own.

    with rt.batcher(max_num_seqs=8) as batcher:
        a = batcher.submit("Explain KV caches.", max_new_tokens=64)       # returns at once
        b = batcher.submit([1, 2, 3], max_new_tokens=16, medusa=False)
        for event in a:                                                    # StreamEvents as a's tokens come
            print(event.text, end="")
        print(b.wait().text)                                               # or the whole GenerationResult

Each request's tokens are exactly what it would get alone (`runtime.engine`). ``cancel()`` drops a request at the
next step; closing the batcher cancels what is left.
"""

from __future__ import annotations

import queue
import threading
import weakref
from typing import Callable

from .generation_config import GenerationConfig, checked_config, request_config
from .engine import DEFAULT_MAX_NUM_BATCHED_TOKENS, Engine, Sequence
from .engine_thread import EngineThread
from .errors import InputError
from .generator import GenerationResult, Generator
from .text_output import StreamEvent


class BatchedStream:
    """One submitted request: iterate for its StreamEvents (from one thread: each event goes to one consumer);
    ``wait`` blocks for its ``result``, from any number of threads, while one iterates or none does."""

    def __init__(self) -> None:
        self.items: queue.Queue = queue.Queue()
        self.result: GenerationResult | None = None
        self.error: Exception | None = None  # kept: every later wait() or iteration raises it again
        self.sequence: Sequence | None = None
        self.engine: Engine | None = None
        self._ended = threading.Event()

    def _sink(self, item) -> None:
        """From the engine's thread: an event, then the result or the error that ends the request."""
        if isinstance(item, BaseException):  # the engine hands over Exceptions; anything else ends it all the same
            self.error = item
        elif isinstance(item, GenerationResult):
            self.result = item
        self.items.put(item)
        if self.error is not None or self.result is not None:
            self._ended.set()

    def __iter__(self):
        while True:
            item = self.items.get()
            if isinstance(item, (BaseException, GenerationResult)):
                self.items.put(item)  # the end stays in the queue: another consumer, or the next iteration, sees it
                if isinstance(item, BaseException):
                    raise item
                return
            yield item

    def wait(self) -> GenerationResult:
        """The result (its error raised, on every call); takes no events from an iterating thread."""
        self._ended.wait()
        if self.error is not None:
            raise self.error
        return self.result

    def cancel(self) -> None:
        self.engine.cancel(self.sequence)


class Batcher:
    def __init__(self, generator: Generator, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS, reuse_prefixes: bool = True) -> None:
        """``reuse_prefixes``: a request starts from the KV rows a finished one left for their shared prefix
        (`prefix_reuse.py`; exact, on the backends where it is on)."""
        self.generator = generator
        self.thread = EngineThread(Engine(generator, max_num_seqs, max_num_batched_tokens,
                                          reuse_prefixes=reuse_prefixes))
        # Dropped without close(): the thread finishes what was submitted, then stops and frees the KV slots (it
        # would otherwise wait for work for ever, holding them, out of reach of `MedusaRuntime.close`).
        weakref.finalize(self, self.thread.retire)

    def submit(self, prompt: str | list[int], config: GenerationConfig | None = None, **options) -> BatchedStream:
        """Queue a request (InputError when it could never run, or when this batcher is closed); its options as a
        `GenerationConfig` or as keywords."""
        cfg = request_config(config, options)
        stream = BatchedStream()
        stream.engine = self.thread.engine
        # The engine holds the handle weakly: a handle nobody holds any more (its caller went away) cancels its
        # request, which then gives its slot to the others instead of decoding to its end for no one.
        stream.sequence = self.thread.submit(prompt, cfg, _weak_sink(stream))
        weakref.finalize(stream, stream.engine.cancel, stream.sequence)
        return stream

    def close(self) -> None:
        self.thread.stop()

    def __enter__(self) -> "Batcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _weak_sink(stream: BatchedStream) -> Callable:
    """``stream``'s sink, holding it weakly (items for a handle that is gone are dropped)."""
    method = weakref.WeakMethod(stream._sink)

    def sink(item) -> None:
        if (bound := method()) is not None:
            bound(item)

    return sink


def generate_many(generator: Generator, prompts: list[str | list[int]], max_num_seqs: int | None = None,
                  max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS, cfg: GenerationConfig | None = None,
                  *, on_step: Callable | None = None,
                  on_result: Callable[[], None] = lambda: None) -> list[GenerationResult]:
    """Every prompt decoded by one batched engine on this thread; the results in prompt order. ``on_step`` gets
    each step's `StepRecord`, ``on_result`` is called as each request ends (progress)."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise InputError(f"prompts must be a list of prompts (texts or lists of token ids), not "
                         f"{type(prompts).__name__}: for one prompt use generate()")
    cfg = checked_config(cfg)
    engine = Engine(generator, max_num_seqs, max_num_batched_tokens, on_step=on_step)
    results: list = [None] * len(prompts)

    def sink(i: int, item) -> None:
        if not isinstance(item, StreamEvent):
            results[i] = item
            on_result()

    try:
        for i, prompt in enumerate(prompts):
            try:
                engine.add(prompt, cfg, lambda item, i=i: sink(i, item))
            except InputError as e:  # which of the prompts it is
                raise InputError(f"prompts[{i}]: {e}") from None
        while engine.step():
            pass
    finally:
        engine.close()
    for item in results:
        if isinstance(item, Exception):
            raise item
    return results
