"""Prompt in, text out: tokenizer + backend + tree + the decode loop, with stopping and streaming.

    gen = Generator(backend, tokenizer, tree)
    result = gen.generate("Hello", GenerationConfig(max_new_tokens=64))
    for event in gen.stream("Hello"):            # text deltas as tokens are accepted
        print(event.text, end="", flush=True)

Each call has its own session (KV buffers), so one `Generator` serves several threads at once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np

from .backends.base import Backend
from .decode import DecodeStats, decode, uses_context
from .generation_config import GenerationConfig, checked_config, is_int
from .errors import InputError, TreeError
from .logprobs import TokenLogprob
from .speculation import Speculation
from .text_output import StreamEvent, TextOutput
from .tokenizer import ChatTokenizer
from .tree import Tree


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # new tokens only
    new_tokens: int
    steps: int  # verification forwards after the prefill
    mean_accepted: float  # step_tokens / steps: tokens per step, the base model's own token included
    tokens_per_s: float
    finish_reason: str  # "stop" (EOS or stop string) | "length" | "abort" (the consumer stopped reading)
    backend: str
    medusa: bool
    prompt_tokens: int = 0
    prefill_ms: float = 0.0
    step_ms: list[float] = field(default_factory=list)
    step_tokens: int = 0  # tokens the steps produced (may exceed new_tokens - 1 when EOS or the limit cut a step)
    step_accepted: list[int] = field(default_factory=list)  # draft tokens each step accepted
    draft_depth: int = 0  # the deepest draft position a step verified (0: no speculation)
    accepted_heads: int = 0  # accepted draft tokens the heads proposed
    accepted_context: int = 0  # accepted draft tokens only the context drafts proposed
    context_rows: int = 0  # context draft rows verified
    heads_steps: int = 0  # steps that verified the heads' tree (0: `medusa` was chosen, never used)
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids when the request asked for them
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (None for its first) when asked
    eos_logprob: TokenLogprob | None = None  # with logprobs: the entry of the end-of-sequence token that ended it
    cached_tokens: int = 0  # prompt tokens it did not prefill: an earlier request's KV rows held them (`prefix_reuse.py`)

    def to_json(self) -> dict:
        keys = ("text", "token_ids", "new_tokens", "steps", "step_tokens", "mean_accepted", "tokens_per_s",
                "finish_reason", "backend", "medusa", "prompt_tokens", "prefill_ms")
        d = asdict(self)
        out = {k: d[k] for k in keys}
        if self.logprobs is not None:  # asked for: each token's, with its best alternatives
            out["logprobs"] = [{"token_id": e.token_id, "logprob": e.logprob,
                                "top_logprobs": [{"token_id": i, "logprob": lp} for i, lp in e.top]}
                               for e in self.logprobs]
        return out


class Stream:
    """Iterator of `StreamEvent`; ``.result`` holds the `GenerationResult` once exhausted or closed. One thread
    reads it; ``close`` may come from any thread."""

    def __init__(self, events: Iterator[StreamEvent], outcome: list, stop: threading.Event) -> None:
        # The events' generator writes the result into ``outcome``, not into this object: a reference from the
        # generator back to its stream would make a cycle, and a stream dropped unfinished (the caller broke out of
        # its loop) would hold its session and KV buffers until the cyclic garbage collector ran (measured: the
        # next request's prefill 2-3x slower meanwhile).
        self._events = events
        self._outcome = outcome
        self._stop = stop  # read by the events' generator after each step
        self._reading = threading.Lock()  # held while a thread runs the generator

    @property
    def result(self) -> GenerationResult | None:
        return self._outcome[0]

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> StreamEvent:
        if not self._reading.acquire(blocking=False):
            if not self._stop.is_set():
                raise InputError("this stream is already being read by another thread: read a stream from one thread")
            self._reading.acquire()  # close() from another thread is ending it: the next() after that stops
        try:
            event = next(self._events)
            if self._stop.is_set():  # closed while this step ran: end now, so that ``result`` is set with it
                self._events.close()
            return event
        finally:
            self._reading.release()

    def close(self) -> None:
        """Stop: the session is released and ``result`` says "abort" unless it had finished (None when no event
        was read: nothing ran). Called while another thread reads the stream, the stream ends with the step that
        thread is waiting for: ``result`` is set as that step's event is returned, and the next read stops."""
        self._stop.set()
        if self._reading.acquire(blocking=False):  # else the reading thread sees the flag and ends the generator
            try:
                self._events.close()
            finally:
                self._reading.release()


def check_tree_paths(tree: Tree | None, max_paths: int | None) -> None:
    """TreeError when ``tree`` has more root-to-leaf paths than a fused graph verifies (``max_paths``; None: any)."""
    paths = len(tree.paths_nodes) if tree is not None else 0
    if max_paths is not None and paths > max_paths:
        # A fused graph verifies each root-to-leaf path in its own head group (exact): it has a fixed number.
        raise TreeError(
            f"the tree has {paths} root-to-leaf paths but this artifact's graph verifies at most "
            f"{max_paths}: use a tree with fewer branches, or rebuild the artifact with this --tree"
        )


class Generator:
    def __init__(self, backend: Backend, tokenizer: ChatTokenizer, tree: Tree | None) -> None:
        dims = backend.dims
        if tree is not None and dims.num_heads and (tree.max_depth > dims.num_heads or tree.topk > dims.head_topk):
            # Otherwise candidate assembly indexes past the heads' outputs (IndexError mid-generation).
            raise TreeError(
                f"tree of depth {tree.max_depth} with top-{tree.topk} ranks does not fit the backend's "
                f"{dims.num_heads} heads with top-{dims.head_topk} each: use a smaller tree"
            )
        check_tree_paths(tree, backend.max_paths)
        self.backend = backend
        self.tokenizer = tokenizer
        self.tree = tree
        self.spec = Speculation()  # acceptance and step cost measured on this backend, shared by its requests

    def generate(self, prompt: str | list[int], cfg: GenerationConfig | None = None, *,
                 heads: bool | None = None) -> GenerationResult:
        stream = self.stream(prompt, cfg, heads=heads)
        for _ in stream:
            pass
        return stream.result

    def stream(self, prompt: str | list[int], cfg: GenerationConfig | None = None, *,
               heads: bool | None = None) -> Stream:
        """``heads``: True verifies the heads' tree on every step of a greedy Medusa request (what a check of the
        Medusa graph needs, e.g. `verify`); None leaves it to what this backend measured (`Speculation.heads_for`)."""
        cfg = checked_config(cfg)
        if heads is not None and heads is not True:  # 1 == True: an int is not the flag
            raise InputError(f"heads must be True or None, not {heads!r:.40}")
        ids = self.prompt_ids(prompt, cfg)
        outcome: list = [None]
        stop = threading.Event()
        return Stream(self._events(ids, cfg, outcome, stop, heads), outcome, stop)

    def prompt_ids(self, prompt: str | list[int], cfg: GenerationConfig) -> list[int]:
        """The prompt's token ids (text under the chat template when ``cfg.chat``), or InputError when the request
        cannot run: Medusa without heads, an empty prompt, no room for one new token."""
        ids = (self.tokenizer.encode_prompt(prompt, chat=cfg.chat) if isinstance(prompt, str) else
               checked_token_ids(prompt, self.backend.dims.vocab_size))
        if cfg.medusa and self.tree is None and not uses_context(cfg):
            raise InputError("this speculative decoding needs Medusa heads and none are loaded (without heads only "
                             "greedy requests speculate, from context drafts): use temperature 0, or --no-medusa")
        if not ids:
            raise InputError("the prompt is empty: give at least one token")
        if cfg.prompt_logprobs is not None and not self.backend.scores_prompts:
            raise InputError(f"prompt_logprobs is not available on the {self.backend.name} backend (a long prompt runs "
                             f"in pieces there, whose borders lose the probabilities): use the ort or torch backend")
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(cfg, name) or 0) > self.backend.dims.sample_topk:
                raise InputError(f"{name} asks for {getattr(cfg, name)} alternatives per token but the graph returns "
                                 f"its best {self.backend.dims.sample_topk}: ask for at most that many")
        if len(ids) + 1 > self.backend.max_seq:
            built = getattr(getattr(self.backend, "manifest", None), "max_seq", None)  # None: a model, no artifact
            fix = ("raise max_seq (--max-seq), up to an artifact's own" if built is None else
                   "rebuild with a larger --max-seq" if self.backend.max_seq >= built else
                   f"open it with a larger max_seq (--max-seq), up to the artifact's {built}")
            raise InputError(f"the prompt has {len(ids)} tokens but the maximum sequence is {self.backend.max_seq}: "
                             f"shorten the prompt or {fix}")
        return ids

    def _events(self, ids: list[int], cfg: GenerationConfig, outcome: list, stop: threading.Event,
                heads: bool | None = None) -> Iterator[StreamEvent]:
        stats = DecodeStats()
        # None: plain, or context drafts only. A sample depends on the trees verified: the artifact's, not one
        # chosen by measured costs, so that a seed gives one answer.
        tree = (None if not cfg.medusa else self.tree if cfg.temperature > 0 or heads else
                self.spec.greedy_tree(self.tree, cfg.context_drafts))
        out = TextOutput(self.tokenizer, cfg)
        t0 = time.perf_counter()
        try:
            with self.backend.new_session() as session:
                for chunk in decode(session, ids, tree, cfg, stats, self.spec, self.backend.max_paths,
                                    self.backend.whole_tree_steps):
                    event = out.push(chunk)
                    if event is not None:
                        yield event
                    if out.finish or stop.is_set():  # stop: closed from another thread; the result says "abort"
                        break
                else:  # the KV buffer is full: the text held back so far is the answer's end
                    event = out.end(stats.finish_reason or "length")
                    if event is not None:
                        yield event
        finally:  # also when the consumer stops early (closes the stream): the result says "abort"
            outcome[0] = result_of(out, stats, out.finish or "abort", self.backend.name, tree, len(ids), t0)


def checked_token_ids(prompt, vocab: int, what: str = "the prompt") -> list[int]:
    """A prompt given as token ids, each checked against the vocabulary (an id outside it failed inside ONNX
    Runtime, and -1 wrapped around to the last token)."""
    if not isinstance(prompt, (list, tuple, np.ndarray)) or getattr(prompt, "ndim", 1) != 1:
        # bytes, sets, dicts and iterators are not token ids in order
        raise InputError(f"{what} must be text or a list of token ids, got {type(prompt).__name__}")
    ids = list(prompt)
    if not all(is_int(t) and 0 <= t < vocab for t in ids):
        raise InputError(f"{what}: token ids must be integers in 0..{vocab - 1}")
    return [int(t) for t in ids]


def result_of(out: TextOutput, stats: DecodeStats, finish: str, backend: str, tree: Tree | None, prompt_tokens: int,
              t0: float) -> GenerationResult:
    elapsed = time.perf_counter() - t0
    return GenerationResult(
        text=out.text,
        token_ids=list(out.new),
        new_tokens=len(out.new),
        steps=stats.steps,
        mean_accepted=round(stats.mean_accepted, 4),
        tokens_per_s=round(len(out.new) / elapsed, 3) if elapsed > 0 else 0.0,
        finish_reason=finish,
        backend=backend,
        medusa=tree is not None,
        prompt_tokens=prompt_tokens,
        prefill_ms=round(stats.prefill_s * 1e3, 3),
        step_ms=[round(s * 1e3, 3) for s in stats.step_s],
        step_tokens=stats.step_tokens,
        step_accepted=list(stats.accepted),
        draft_depth=stats.draft_depth,
        accepted_heads=stats.accepted_heads,
        accepted_context=stats.accepted_context,
        context_rows=stats.context_rows,
        heads_steps=stats.heads_steps,
        logprobs=None if out.logprobs is None else list(out.logprobs),
        prompt_logprobs=None if out.cfg.prompt_logprobs is None else [None, *stats.prompt_logprobs],
        eos_logprob=out.eos_logprob,
        cached_tokens=stats.cached_tokens,
    )
