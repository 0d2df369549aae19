"""What the batched engine (`engine.py`) keeps per request and records per step.

    seq = Sequence(prompt_ids, GenerationConfig(max_new_tokens=64), sink=print)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from .backends.base import Session
from .decode import Cursor, DecodeStats
from .generation_config import GenerationConfig
from .generator import GenerationResult
from .text_output import StreamEvent, TextOutput
from .tree import Tree


@dataclass(eq=False)  # compared and hashed by identity (a request)
class Sequence:
    prompt: list[int]
    cfg: GenerationConfig
    sink: Callable[[StreamEvent | GenerationResult | Exception], None]  # events, then the result or the error
    session: Session | None = None  # while it holds a KV slot
    slot: int = -1  # which: also its lane in batched steps (a lane keeps its KV bindings)
    out: TextOutput | None = None
    stats: DecodeStats = field(default_factory=DecodeStats)
    cursor: Cursor | None = None  # set once the whole prompt is in the cache
    fed: int = 0  # prompt tokens in the KV cache
    cancelled: str | None = None  # "abort" | "timeout" | ...: stop at the next step
    t0: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None  # when it took a KV slot
    tree: Tree | None = None  # the heads' tree its one-sequence steps use (`Speculation.heads_for`)
    sent_event: bool = False  # its first event has gone to the sink
    made: list[int] = field(default_factory=list)  # every token its steps made final, kept or not by its output

    def tokens_in_cache(self) -> list[int]:
        """The tokens whose rows its KV cache holds: the prompt and what its steps made, but the last (the next root,
        never fed)."""
        return (self.prompt + self.made)[:self.session.length]

    def send(self, event: StreamEvent | None) -> None:
        """``event`` (if any) to the sink; the first carries the prompt's log-probabilities where they were asked for
        (the prompt is all in by then)."""
        if event is None:
            return
        if not self.sent_event and self.cfg.prompt_logprobs is not None:
            event.prompt_logprobs = [None, *self.stats.prompt_logprobs]
        self.sent_event = True
        self.sink(event)

    @property
    def scoring_prompt(self) -> bool:
        """Its prompt is still going in and is scored (`prompt_logprobs`): only the one-sequence graphs give that."""
        return self.cursor is None and self.cfg.prompt_logprobs is not None


@dataclass
class StepRecord:
    """What one engine step did (metrics: batch size per step, how often speculation ran)."""

    sequences: int
    rows: int
    speculative: bool
    seconds: float
