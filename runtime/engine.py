"""Continuous batching: many sequences decode together, each answer exactly what it would be alone.

    engine = Engine(generator, max_num_seqs=8, max_num_batched_tokens=64)   # batches on generator.backend.lanes
    seq = engine.add(prompt_ids, GenerationConfig(max_new_tokens=64), sink=print)   # StreamEvent..., then a result
    while engine.step():          # one step of every running sequence (or on a thread: `engine_thread.EngineThread`)
        pass

Sequences join and leave at every step. A step is one of two kinds:

* alone (one running sequence, or an artifact without a lanes graph): the one-sequence graphs, with the heads'
  tree and context drafts when the request speculates (`decode.step`); with a lanes graph its prompt goes in
  chunks of ``max_num_batched_tokens``, so that a request arriving meanwhile joins within one chunk;
* batched: one lanes step (`backends/ort_lanes.py`) over all running sequences: each decoding sequence feeds its
  next token and, for greedy ones, the context drafts that pay in a step of that many rows (`speculation.py`);
  each prefilling one a chunk of its prompt, within ``max_num_batched_tokens`` rows, so a long prompt delays the
  others by at most one chunk. The lanes graph runs no heads: a batch row costs about what a tree node costs, so
  under load only drafts likely to be accepted are verified (`docs/serving.md`, "Speculation under load").

Both kinds compute every row exactly as a one-sequence step does, so a sequence's tokens do not depend on what
ran beside it, when it joined, or whether its steps were trees (tests/test_engine.py). Every sequence's KV cache
is preallocated once (``max_num_seqs`` slots) and reused; a new request starts from the rows a slot, or a running
sequence, holds for its prompt's prefix (`prefix_reuse.py`).
"""

from __future__ import annotations

import copy
import numbers
import threading
import time
from typing import Callable, TypeVar

import numpy as np

from .backends.base import Session
from .backends.lanes import Lane, LanesRunner, more_lanes_fix
from .context_drafts import DEFAULT_MAX_DRAFT, Draft
from .decode import accept, feed, finish_step, prefill, start_cursor, step
from .engine_sequence import Sequence, StepRecord
from .errors import InputError, as_exception
from .generation_config import GenerationConfig, checked_config
from .generator import Generator, result_of
from .prefill_shares import fair_shares
from .prefix_reuse import SlotPrefixes
from .step_tree import StepTree
from .text_output import TextOutput

T = TypeVar("T")

# Rows one step takes. Prefill is compute-bound on a CPU (a 64-row chunk beside seven decoding streams took 0.39 s
# on the measured 2-core machine, 256 rows 1.3 s): a small chunk bounds how long the running streams wait for their
# next token, while a long prompt's total prefill time hardly changes (docs/results.md, "Mixed load").
DEFAULT_MAX_NUM_BATCHED_TOKENS = 64


class Engine:
    def __init__(self, generator: Generator, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
                 on_step: Callable[[StepRecord], None] | None = None, reuse_prefixes: bool = True) -> None:
        """``max_num_seqs``: sequences running at once (default: the lanes of the backend's batched graph, else 1).
        ``reuse_prefixes``: a request starts from the KV rows a finished one left for their shared prefix
        (`prefix_reuse.py`), on backends where that is exact."""
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens)):
            if not (value is None and name == "max_num_seqs") and not (
                    isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1):
                raise InputError(f"{name} must be an integer >= 1, got {value!r:.40}")
        max_num_seqs = None if max_num_seqs is None else int(max_num_seqs)  # a numpy integer too
        max_num_batched_tokens = int(max_num_batched_tokens)
        # One sequence at a time never takes a batched step: its graph (its memory) is not opened then.
        lanes: LanesRunner | None = None if max_num_seqs == 1 else generator.backend.lanes
        max_num_seqs = max_num_seqs or (lanes.lanes if lanes else 1)
        if lanes is not None and max_num_seqs > lanes.lanes:
            raise InputError(f"max_num_seqs {max_num_seqs} (--max-num-seqs) exceeds the artifact's batched steps "
                             f"({lanes.lanes} lanes): {more_lanes_fix(lanes.lanes, max_num_seqs)}")
        if max_num_batched_tokens < max_num_seqs:
            raise InputError(f"max_num_batched_tokens {max_num_batched_tokens} (--max-num-batched-tokens) must be at "
                             f"least max_num_seqs {max_num_seqs} (one row per running sequence)")
        self.gen, self.lanes = generator, lanes
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.on_step = on_step
        backend = generator.backend
        self.slots = [backend.new_session() for _ in range(max_num_seqs)]  # preallocated KV, reused
        self.free = list(range(max_num_seqs))  # slot indices
        self.prefixes = SlotPrefixes(max_num_seqs, reuse_prefixes and backend.reuses_rows)
        self.kv_bytes = sum(s.kv_bytes for s in self.slots)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.lock = threading.Lock()  # waiting / cancellation may change from other threads
        self.closed = False  # set by `close`: `add` refuses from then on
        self.scored_last = False  # the last step scored a prompt chunk (`_scoring_turn`)

    # ---- requests -------------------------------------------------------------------------------------
    def add(self, prompt: str | list[int], cfg: GenerationConfig, sink: Callable) -> Sequence:
        """Queue a request (text, encoded as `Generator.prompt_ids` does, or token ids); InputError when it could
        never run (what `prompt_ids` refuses). As with `generate`, a request whose answer reaches the end of the KV
        capacity ends there with finish reason "length" (the server refuses such requests before they queue)."""
        # Its own copy: the caller may change or reuse its object while the request runs. (Checked when it was made;
        # not again here, where tests set a value past validation to make one request's step fail.)
        cfg = copy.copy(cfg) if isinstance(cfg, GenerationConfig) else checked_config(cfg)
        prompt = self.gen.prompt_ids(prompt, cfg)
        seq = Sequence(prompt, cfg, sink)
        with self.lock:
            if self.closed:  # it would wait for ever: nothing steps a closed engine
                raise InputError("this engine is closed: its requests were cancelled; open a new one")
            self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence, reason: str = "abort") -> None:
        """Stop ``seq`` at the next step (from any thread); its slot is freed then, the others carry on."""
        seq.cancelled = seq.cancelled or reason

    def withdraw(self, seq: Sequence) -> bool:
        """Hand ``seq`` back now, cancelled, if it is still queued (from any thread; after `cancel`): the next step,
        which drops it otherwise, may be a whole prompt's prefill away. False when it had left the queue."""
        with self.lock:  # the lock `_admit` takes requests off the queue under: one of the two hands it back
            if not any(s is seq for s in self.waiting):
                return False
            self.waiting = [s for s in self.waiting if s is not seq]
        self._finish(seq, seq.cancelled or "abort")
        return True

    @property
    def idle(self) -> bool:
        return not (self.running or self.waiting)

    # ---- one step -------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Admit waiting requests into free slots, run one step, retire what ended. False when idle."""
        self._admit()
        self._retire()
        if not self.running:
            return bool(self.waiting)
        t0 = time.perf_counter()
        if (scoring := self._scoring_turn()) is not None:
            group = [scoring]
        else:  # a prompt being scored takes no lane: a lanes step's rows lack the input tokens' probabilities
            group = [s for s in self.running if not s.scoring_prompt] if self.lanes is not None else list(self.running)
        if len(group) == 1 or self.lanes is None:
            rows, spec = 0, False
            for seq in group:  # without a lanes graph, one sequence after the other
                r, s = self._isolated(seq, self._alone) or (0, False)
                rows, spec = rows + r, spec or s
        else:
            try:
                rows, spec = self._batched(group)
            except Exception as e:  # noqa: BLE001 - the backend failed: these requests end with it, the engine stays up
                self.fail(e)
                return True
        self._retire()
        if self.on_step is not None:
            self.on_step(StepRecord(len(group), rows, spec, time.perf_counter() - t0))
        return True

    def _scoring_turn(self) -> Sequence | None:
        """The sequence whose prompt chunk this step scores alone on the one-sequence graphs (`prompt_logprobs`), or
        None: every other step while other sequences run, so that they wait at most one chunk for their next token."""
        scoring = next((s for s in self.running if s.scoring_prompt), None)
        if scoring is None or self.scored_last and any(not s.scoring_prompt for s in self.running):
            self.scored_last = False
            return None
        self.scored_last = True
        return scoring

    def _admit(self) -> None:
        """Queued requests into free slots. Sinks run after the queue's lock is released: one may queue a request
        (a follow-up to the answer it was handed), and `add` takes that lock."""
        with self.lock:
            # Cancelled requests leave the queue at once, free slots or not (their place in the server's queue
            # is released when their result is handed back).
            cancelled = [s for s in self.waiting if s.cancelled]
            self.waiting = [s for s in self.waiting if not s.cancelled]
            admitted, passed = [], []
            # One prompt is scored at a time (`_scoring_turn`): a second one would hold a KV slot and wait there,
            # idle, while requests behind it cannot start. It stays queued (in its place) until the slot can serve it.
            scoring = any(s.scoring_prompt for s in self.running)
            kept = 0  # free slots kept for requests waiting for rows (else taken from behind: a whole answer's wait)
            while (self.waiting and len(self.free) > kept
                   and len(self.running) + len(admitted) + kept < self.max_num_seqs):
                seq = self.waiting.pop(0)
                if seq.scoring_prompt:
                    if scoring:
                        passed.append(seq)
                        continue
                    scoring = True
                place = self.prefixes.place(self.free, seq, self.running + [a[0] for a in admitted])
                if place is None:  # a running sequence's prompt going in will hold its prefix: it waits for those rows
                    passed, kept = passed + [seq], kept + 1
                    continue
                admitted.append((seq, *place))
            self.waiting[:0] = passed
        for seq in cancelled:
            self._finish(seq, seq.cancelled)
        for seq, slot, cached, donor in admitted:
            self._start(seq, slot, cached, donor)

    def _start(self, seq: Sequence, slot: int, cached: int = 0, donor: Sequence | None = None) -> None:
        """``seq`` takes KV slot ``slot``, with the rows of its prompt's first ``cached`` tokens (or ``donor``'s)."""
        try:
            session = self._fresh(self.slots[slot], 0 if donor else cached)
            if donor is not None:
                session.copy_rows(donor.session, cached)
            self.slots[slot] = session
            seq.fed = seq.stats.cached_tokens = session.length
            seq.out = TextOutput(self.gen.tokenizer, seq.cfg)
            # A sampled request decodes plainly here: a lanes step runs no heads, so with them its sample would
            # depend on whether it ran alone; a seed then gives one answer whatever shares the batch.
            greedy = seq.cfg.medusa and seq.cfg.temperature == 0
            seq.tree = self.gen.spec.greedy_tree(self.gen.tree, seq.cfg.context_drafts) if greedy else None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - the backend could not reset the slot (or panicked), or the
            self.free.append(slot)  # request could not start: its slot back, its error to it (it left the queue)
            self.prefixes.release(slot, None)
            seq.sink(as_exception(e))
            return
        seq.slot, seq.session = slot, session
        seq.admitted_at = time.perf_counter()
        self.running.append(seq)

    def _fresh(self, session: Session, keep: int = 0) -> Session:
        """``session`` emptied but its first ``keep`` rows (a new one on backends that cannot reuse theirs)."""
        try:
            session.rewind(keep) if keep else session.reset()
            return session
        except NotImplementedError:
            session.close()
            return self.gen.backend.new_session()

    def _alone(self, seq: Sequence) -> tuple[int, bool]:
        """One step of ``seq`` on the one-sequence graphs (a chunk of its prompt, or a (tree) step). With a lanes
        graph the prompt goes in chunks of the step budget, so that requests arriving meanwhile join within one
        chunk; without one, whole (the requests run one after the other anyway)."""
        tree = seq.tree
        if seq.cursor is None:
            t0 = time.perf_counter()
            take = len(seq.prompt) - seq.fed
            if self.lanes is not None:
                take = min(take, self.gen.backend.alone_prefill_chunk or self.max_num_batched_tokens)
            if seq.fed + take < len(seq.prompt):
                feed(seq.session, seq.prompt[seq.fed:seq.fed + take], tree is not None, seq.cfg,
                     after=seq.prompt[seq.fed + take], stats=seq.stats)
            else:
                rng = np.random.default_rng(seq.cfg.seed)
                seq.cursor = prefill(seq.session, seq.prompt, tree is not None, seq.cfg, rng, start=seq.fed,
                                     stats=seq.stats)
                self._emit(seq, seq.cursor.first)
            seq.fed += take
            seq.stats.prefill_s += time.perf_counter() - t0
            return take, False
        b = self.gen.backend
        new = step(seq.session, seq.cursor, tree, seq.cfg, seq.stats, self.gen.spec, b.max_paths, b.whole_tree_steps)
        if new is None:
            self._end(seq, "length")
            return 0, False
        self._emit(seq, new)
        return seq.stats.last_rows, seq.stats.last_rows > 1

    def _batched(self, live: list[Sequence]) -> tuple[int, bool]:
        """One lanes step: each decoding sequence's next token and the context drafts that pay, prompt chunks
        within the token budget (before drafts)."""
        budget = self.max_num_batched_tokens - sum(seq.cursor is not None for seq in live)
        prefilling = [seq for seq in live if seq.cursor is None]
        takes = dict(zip(prefilling, fair_shares([len(seq.prompt) - seq.fed for seq in prefilling], budget)))
        chunks = sum(takes.values())
        budget -= chunks
        lanes: list[Lane | None] = [None] * self.max_num_seqs
        chosen, decoding = [], []
        for seq in live:
            if seq.cursor is not None:
                if seq.session.length + 1 > seq.session.capacity:  # as alone: the next token needs one row
                    self._isolated(seq, lambda s: self._end(s, "length"))
                    continue
                decoding.append(seq)
                tokens = [seq.cursor.root]
            else:
                if takes[seq] < 1:
                    continue  # no budget left this step: its next chunk waits one step
                tokens = seq.prompt[seq.fed:seq.fed + takes[seq]]
            temperature = seq.cfg.temperature if seq.cfg.temperature > 0 else 1.0
            outputs = None if seq.cursor is not None else int(seq.fed + len(tokens) == len(seq.prompt))  # last row
            lanes[seq.slot] = Lane(seq.session, np.asarray(tokens, np.int64), temperature, outputs)
            chosen.append(seq)
        if not chosen:
            return 0, False
        drafts = self._drafts(decoding, len(decoding) + chunks, budget)
        for seq, draft in drafts.items():
            lanes[seq.slot].tokens = np.asarray([seq.cursor.root, *draft.tokens], np.int64)
        t0 = time.perf_counter()
        outs = self.lanes.run(lanes)
        seconds = time.perf_counter() - t0
        rows = sum(len(lane.tokens) for lane in lanes if lane)
        self.gen.spec.batched_cost.record(rows, seconds)
        for seq in chosen:
            self._isolated(seq, lambda s: self._take(s, lanes[s.slot], outs[s.slot], drafts.get(s), seconds))
        return rows, bool(drafts)

    def _take(self, seq: Sequence, lane: Lane, out, draft: Draft | None, seconds: float) -> None:
        """A sequence's share of a lanes step: its prompt chunk kept, or its tokens accepted."""
        if seq.cursor is None:  # a prompt chunk: done once the whole prompt is in
            self.lanes.keep(seq.session, np.arange(len(lane.tokens)))
            seq.fed += len(lane.tokens)
            seq.stats.prefill_s += seconds
            if seq.fed == len(seq.prompt):
                seq.cursor = start_cursor(seq.prompt, out, -1, seq.cfg, np.random.default_rng(seq.cfg.seed))
                self._emit(seq, seq.cursor.first)
        else:
            self._advance(seq, out, draft, seconds)

    def _isolated(self, seq: Sequence, work: Callable[[Sequence], T]) -> T | None:
        """``work(seq)``; if it raises, that sequence alone ends with the error (its cache may be half-written) and
        the others carry on: one request's failure (a backend error in its own step, its sampling) is not theirs."""
        try:
            return work(seq)
        except Exception as e:  # noqa: BLE001
            self._release(seq, intact=False)
            seq.sink(e)
            return None

    def _drafts(self, decoding: list[Sequence], rows: int, budget: int) -> dict:
        """The context drafts worth verifying in this lanes step, by sequence (`speculation.StepCost.worth`); ``rows``:
        the step's rows without drafts (its sequences' roots and prompt chunks)."""
        spec = self.gen.spec
        found = {seq: seq.cursor.propose(spec, DEFAULT_MAX_DRAFT) for seq in decoding if seq.cursor.context}
        found = {seq: d for seq, d in found.items() if d is not None}
        if not found:
            return {}
        take = [0] * len(found)  # a step without drafts, to measure it (`PLAIN_MIN`): they are only watched
        if not spec.batched_cost.plain_due(rows):
            room = {seq: min(len(d.tokens), seq.session.capacity - seq.session.length - 1) for seq, d in found.items()}
            chains = [spec.rates.cumulative(d.rate_kind, room[seq]) for seq, d in found.items()]
            take = spec.batched_cost.worth(chains, len(decoding), rows, budget)
        cut = {seq: seq.cursor.take_draft(d, n) for (seq, d), n in zip(found.items(), take)}  # the rest: watched
        return {seq: d for seq, d in cut.items() if d is not None}

    def _advance(self, seq: Sequence, out, draft: Draft | None, seconds: float) -> None:
        """A decoding sequence's lanes step: its root and drafts, a chain verified as a one-sequence step is."""
        p = StepTree.chain(seq.cursor.root, *((draft.tokens, draft.rate_kind) if draft else ([],)))
        acc_nodes = accept(p, out, seq.cfg)  # only greedy sequences have drafts
        self.lanes.keep(seq.session, acc_nodes)
        self._emit(seq, finish_step(seq.cursor, p, acc_nodes, out, seq.cfg, seq.stats, self.gen.spec, seconds))

    # ---- results --------------------------------------------------------------------------------------
    def _emit(self, seq: Sequence, tokens: list[int]) -> None:
        seq.made += tokens
        seq.send(seq.out.push(tokens))

    def _end(self, seq: Sequence, reason: str) -> None:
        """``seq`` ends for a reason outside its tokens (its KV slot is full): the text held back is sent."""
        seq.send(seq.out.end(reason))

    def _retire(self) -> None:
        """Hand back the slots of sequences that ended or were cancelled; send their results."""
        for seq in [s for s in self.running if s.out.finish or s.cancelled]:
            self._release(seq)
            # A cancel that came after the answer ended (its last event already sent) leaves its finish as it is.
            self._finish(seq, seq.out.finish or seq.cancelled)

    def _release(self, seq: Sequence, intact: bool = True) -> None:
        """``seq`` leaves its slot; ``intact``: its rows are whole (no step of it failed), kept for reuse."""
        self.running.remove(seq)
        self.free.append(seq.slot)
        self.prefixes.release(seq.slot, seq.tokens_in_cache() if intact else None)
        seq.session, seq.slot = None, -1

    def _finish(self, seq: Sequence, finish: str) -> None:
        """Hand ``seq``, which has left the queue or the running list, its result, or the error building it raised:
        `fail` would not reach it any more, and without an end its caller waits for ever. A sink's own error
        propagates, after one end item."""
        try:
            out = seq.out or TextOutput(self.gen.tokenizer, seq.cfg)
            result = result_of(out, seq.stats, finish, self.gen.backend.name, seq.tree, len(seq.prompt), seq.t0)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001
            seq.sink(as_exception(e))
            return
        seq.sink(result)

    def fail(self, error: Exception) -> None:
        """A step failed: every running sequence ends with ``error`` (their caches may be half-written); queued
        ones carry on."""
        for seq in list(self.running):
            self._release(seq, intact=False)
            seq.sink(error)

    def close(self) -> None:
        """Cancel everything still queued or running (each gets its result) and free the KV slots."""
        with self.lock:
            self.closed = True
            for seq in self.waiting + self.running:
                seq.cancelled = seq.cancelled or "abort"
            waiting, self.waiting = self.waiting, []
        for seq in waiting:  # outside the lock, as in `_admit`
            self._finish(seq, seq.cancelled)
        self._retire()
        for session in self.slots:
            session.close()
        self.slots, self.free = [], []
