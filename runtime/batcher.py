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

from .decode import GenerationConfig
from .engine import DEFAULT_MAX_NUM_BATCHED_TOKENS, Engine, EngineThread, Sequence
from .generator import GenerationResult, Generator
from .text_output import StreamEvent


class BatchedStream:
    """One submitted request: iterate for its StreamEvents; ``result`` once it ended (`wait` blocks for it)."""

    def __init__(self) -> None:
        self.items: queue.Queue = queue.Queue()
        self.result: GenerationResult | None = None
        self.sequence: Sequence | None = None
        self.engine: Engine | None = None

    def _sink(self, item) -> None:
        self.items.put(item)

    def __iter__(self):
        while self.result is None:
            item = self.items.get()
            if isinstance(item, Exception):
                raise item
            if isinstance(item, GenerationResult):
                self.result = item
                return
            yield item

    def wait(self) -> GenerationResult:
        for _ in self:
            pass
        return self.result

    def cancel(self) -> None:
        self.engine.cancel(self.sequence)


class Batcher:
    def __init__(self, generator: Generator, max_num_seqs: int | None = None, max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS) -> None:
        lanes = generator.backend.lanes
        seqs = max_num_seqs or (lanes.lanes if lanes else 1)
        self.generator = generator
        self.thread = EngineThread(Engine(generator, lanes, seqs, max_num_batched_tokens))

    def submit(self, prompt: str | list[int], **options) -> BatchedStream:
        cfg = GenerationConfig(**options)
        stream = BatchedStream()
        stream.engine = self.thread.engine
        stream.sequence = self.thread.submit(self.generator.prompt_ids(prompt, cfg), cfg, stream._sink)
        return stream

    def close(self) -> None:
        self.thread.stop()

    def __enter__(self) -> "Batcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def generate_many(generator: Generator, prompts: list[str | list[int]], max_num_seqs: int | None = None,
                  max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS, **options) -> list[GenerationResult]:
    """Every prompt decoded by one batched engine on this thread; the results in prompt order."""
    lanes = generator.backend.lanes
    engine = Engine(generator, lanes, max_num_seqs or (lanes.lanes if lanes else 1), max_num_batched_tokens)
    cfg = GenerationConfig(**options)
    results: list = [None] * len(prompts)
    try:
        for i, prompt in enumerate(prompts):
            engine.add(generator.prompt_ids(prompt, cfg), cfg,
                       lambda item, i=i: results.__setitem__(i, item) if not isinstance(item, StreamEvent) else None)
        while engine.step():
            pass
    finally:
        engine.close()
    for item in results:
        if isinstance(item, Exception):
            raise item
    return results
