"""Adversarial schedules for the batched engine: requests of every kind submitted from several threads while other
threads cancel and withdraw them at random moments (racing the steps), streams abandoned by their readers, answers
running into the end of the KV cache while drafts are verified beside other requests. Every request must end exactly
once, every greedy answer must be vanilla decoding's alone, and every KV slot must come back."""

from __future__ import annotations

import gc
import os
import random
import threading
import time
from dataclasses import replace

import pytest

from conftest import TINY_VOCAB, ClockFreeCost

from medusa_export.runtime.decode import GenerationConfig
from medusa_export.runtime.engine import Engine
from medusa_export.runtime.engine_thread import EngineThread
from medusa_export.runtime.generator import GenerationResult
from medusa_export.runtime.text_output import StreamEvent

pytest.importorskip("onnxruntime")
SEQS = 3
SEEDS = [int(s) for s in os.environ.get("ENGINE_RACE_SEEDS", "1 2 3").split()]  # more for a longer search


@pytest.fixture(scope="module")
def rt(artifact):
    from medusa_export.runtime.api import MedusaRuntime

    with MedusaRuntime.load(artifact, threads=1) as runtime:
        yield runtime


@pytest.fixture
def drafts_pay(rt):
    """Every draft pays in lanes steps (fixed step costs, not this machine's): the schedules verify drafts."""
    measured, rt.generator.spec.batched_cost = rt.generator.spec.batched_cost, ClockFreeCost(0.0)
    yield
    rt.generator.spec.batched_cost = measured


class Ends:
    """What one request's sink was handed: its events, its end items (exactly one expected), anything after the end."""

    def __init__(self) -> None:
        self.events: list[StreamEvent] = []
        self.ends: list = []
        self.after_end: list = []
        self.done = threading.Event()

    def sink(self, item) -> None:
        if self.ends:
            self.after_end.append(item)
        if isinstance(item, StreamEvent):
            self.events.append(item)
        else:
            self.ends.append(item)
            self.done.set()


def _request(r: random.Random, rt) -> tuple[list[int], GenerationConfig]:
    max_seq = rt.generator.backend.max_seq
    kind = r.random()
    if kind < 0.2:
        prompt = [r.randrange(1, TINY_VOCAB - 1) for _ in range(max_seq - r.choice([1, 2, 3, 6]))]
    elif kind < 0.6:
        prompt = ([r.randrange(1, TINY_VOCAB - 1) for _ in range(r.randint(2, 4))] * 20)[:r.randint(2, 60)]
    else:
        prompt = [r.randrange(1, TINY_VOCAB - 1) for _ in range(r.randint(1, 30))]
    cfg = GenerationConfig(max_new_tokens=r.choice([1, 2, r.randint(1, 150)]), ignore_eos=r.random() < 0.5)
    if r.random() < 0.7:
        cfg = replace(cfg, medusa=r.random() < 0.8, context_drafts=r.random() < 0.85)
    else:
        cfg = replace(cfg, temperature=r.choice([0.5, 1.0]), seed=r.randrange(1000), medusa=r.random() < 0.5)
    if r.random() < 0.3:
        text = rt.generator.generate(prompt, replace(cfg, medusa=False)).text
        if len(text) > 2:
            start = r.randrange(len(text) - 1)
            cfg = replace(cfg, stop_strings=(text[start:start + r.randint(1, 6)],))
    return prompt, cfg


@pytest.fixture(scope="module")
def portable_rt(portable_artifact):
    from medusa_export.runtime.api import MedusaRuntime

    with MedusaRuntime.load(portable_artifact, threads=1) as runtime:
        yield runtime


@pytest.mark.parametrize("kind", ["lanes", "one-seq", "portable"])
@pytest.mark.parametrize("seed", SEEDS)
def test_cancels_and_withdrawals_racing_the_steps_end_every_request_once(request, drafts_pay, seed, kind):
    rt = request.getfixturevalue("portable_rt" if kind == "portable" else "rt")
    r = random.Random(seed)
    requests = [_request(r, rt) for _ in range(14)]
    cancel_after = [r.choice([None, None, 0.0, r.uniform(0, 0.05), r.uniform(0, 0.3)]) for _ in requests]
    pauses = [r.uniform(0, 0.01) for _ in requests]
    seqs_n = 1 if kind == "one-seq" else SEQS
    engine = Engine(rt.generator, max_num_seqs=seqs_n, max_num_batched_tokens=r.choice([SEQS, 8, 64]))
    thread = EngineThread(engine, name="attack-engine")
    ends = [Ends() for _ in requests]
    seqs: dict[int, object] = {}

    def submitter(indices: list[int]) -> None:
        for i in indices:
            time.sleep(pauses[i])
            seqs[i] = thread.submit(requests[i][0], requests[i][1], ends[i].sink)
            if cancel_after[i] is not None:
                threading.Timer(cancel_after[i], lambda i=i: (engine.cancel(seqs[i], "timeout"),
                                                              engine.withdraw(seqs[i]))).start()

    workers = [threading.Thread(target=submitter, args=(list(range(k, len(requests), 3)),)) for k in range(3)]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        for i, e in enumerate(ends):
            assert e.done.wait(120), f"request {i} never ended"
        time.sleep(0.4)  # the last timers fire (on requests that ended): nothing more may reach a sink
        deadline = time.monotonic() + 30
        while not engine.idle and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.idle and sorted(engine.free) == list(range(seqs_n)), (engine.running, engine.free)
    finally:
        thread.stop()
    for i, ((prompt, cfg), e) in enumerate(zip(requests, ends)):
        where = f"request {i}: {len(prompt)}-token prompt, {cfg}, cancel after {cancel_after[i]}"
        assert len(e.ends) == 1 and not e.after_end, where
        got = e.ends[0]
        assert isinstance(got, GenerationResult), (where, got)
        assert "".join(x.text for x in e.events) == got.text, where
        assert [t for x in e.events for t in x.token_ids] == got.token_ids, where
        if got.finish_reason == "timeout":
            continue
        alone = rt.generator.generate(prompt, replace(cfg, medusa=False))
        assert (got.token_ids, got.text, got.finish_reason) == (alone.token_ids, alone.text, alone.finish_reason), where


def test_a_stream_abandoned_by_its_reader_frees_its_slot(rt):
    """A reader that breaks out of its loop and drops the handle: its request is cancelled, its slot given to the
    requests queued behind it, whose answers are unchanged."""
    opts = dict(max_new_tokens=100, ignore_eos=True, medusa=False)
    prompts = [[5, 6, 7], [9, 10, 11, 12], [40, 41]]
    alone = [rt.generate(p, **opts).token_ids for p in prompts]
    with rt.batcher(max_num_seqs=1) as batcher:
        stream = batcher.submit(prompts[0], **opts)
        for _ in stream:
            break  # the reader stops reading
        seq = stream.sequence
        del stream
        gc.collect()
        assert seq.cancelled == "abort"
        others = [batcher.submit(p, **opts) for p in prompts[1:]]
        assert [o.wait().token_ids for o in others] == alone[1:]
        engine = batcher.thread.engine
        deadline = time.monotonic() + 30
        while not engine.idle and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.idle and engine.free == [0]


@pytest.mark.parametrize("short", [1, 2, 3, 5, 8])
def test_drafts_verified_at_the_end_of_the_cache_beside_others_change_no_answer(rt, drafts_pay, short):
    """Prompts that repeat themselves (long context drafts) ending ``short`` tokens before the maximum sequence, with
    budgets past it, decoded beside each other and beside a sampled request: each greedy answer is vanilla decoding's
    alone, ending at the KV capacity with "length"."""
    max_seq = rt.generator.backend.max_seq
    prompts = [([7, 8, 9] * 60)[:max_seq - short], ([3, 4] * 80)[:max_seq - short - 1], [5, 6, 7, 8] * 3]
    configs = [GenerationConfig(max_new_tokens=200, ignore_eos=True),
               GenerationConfig(max_new_tokens=200, ignore_eos=True, medusa=True, context_drafts=True),
               GenerationConfig(max_new_tokens=40, ignore_eos=True, temperature=0.8, seed=3)]
    ends = [Ends() for _ in prompts]
    engine = Engine(rt.generator, max_num_seqs=SEQS, max_num_batched_tokens=16)
    try:
        for p, c, e in zip(prompts, configs, ends):
            engine.add(p, c, e.sink)
        n = 0
        while engine.step():
            n += 1
            assert n < 2000
        assert sorted(engine.free) == list(range(SEQS))
    finally:
        engine.close()
    for p, c, e in zip(prompts, configs, ends):
        alone = rt.generator.generate(p, replace(c, medusa=False))
        got = e.ends[0]
        assert (got.token_ids, got.finish_reason) == (alone.token_ids, alone.finish_reason), (len(p), c)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_scheduler_under_random_cancels_timeouts_and_a_drain_counts_every_request_out_once(rt, seed):
    """Requests submitted in bursts (some refused with 429), cancelled at random moments from the event loop, some
    timing out while queued or running, then a drain with a short deadline: each admitted request gets exactly one
    Finished, the admission count and the gauges return to zero, every KV slot is free."""
    import asyncio

    pytest.importorskip("prometheus_client")
    from medusa_export.runtime.serve.metrics import ServerMetrics
    from medusa_export.runtime.serve.requests import ApiError, Job
    from medusa_export.runtime.serve.scheduler import Finished, Scheduler

    r = random.Random(seed)
    metrics = ServerMetrics("m")
    jobs = []
    for _ in range(20):
        prompt, cfg = _request(r, rt)
        jobs.append(Job(prompt, cfg, False, False, False))

    async def main() -> tuple[Scheduler, list, int]:
        sched = Scheduler(rt.generator, SEQS, r.choice([SEQS, 8, 64]), 4, r.choice([0.05, 0.3, 60.0]), metrics)
        admitted, refused, finished = [], 0, []

        async def consume(request) -> None:
            items = [item async for item in request.events()]
            finished.append(items)

        tasks = []
        try:
            for job in jobs:
                try:
                    request = sched.submit(job)
                except ApiError as e:
                    assert e.status == 429
                    refused += 1
                    continue
                admitted.append(request)
                tasks.append(asyncio.ensure_future(consume(request)))
                if r.random() < 0.3:
                    asyncio.get_running_loop().call_later(r.choice([0.0, 0.01, 0.1]), request.cancel)
                await asyncio.sleep(r.choice([0.0, 0.0, 0.005, 0.05]))
            assert await sched.drain(r.choice([0.0, 0.2, 5.0])) in (True, False)
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
            assert sorted(sched.engine.free) == list(range(SEQS))  # every slot back before the engine closes
        finally:
            sched.stop()
        return sched, finished, refused

    sched, finished, refused = asyncio.run(main())
    assert all(sum(isinstance(x, Finished) for x in items) == 1 and isinstance(items[-1], Finished)
               for items in finished)
    assert sched.admitted == 0 and not sched.live
    total = sum(metrics.registry.get_sample_value("medusa_export:request_success_total",
                                                  {**metrics.labels, "finished_reason": reason}) or 0
                for reason in ("stop", "length", "abort", "timeout", "shutdown", "error"))
    assert total == len(finished) and total + refused == len(jobs)
    assert all(items[-1].error is None for items in finished), [items[-1].error for items in finished]


@pytest.mark.parametrize("together", [False, True])
@pytest.mark.parametrize("room", [1, 2, 3, 7])
def test_an_answer_that_exactly_fills_the_context_gets_every_token_it_asked_for(rt, drafts_pay, room, together):
    """What the server admits at the limit: a prompt of ``max_seq - room`` tokens and ``max_new_tokens = room``. Each
    request ends on its budget ("length") with exactly ``room`` tokens, vanilla decoding's alone, whether it ran
    alone in the engine (the heads' tree and drafts) or beside others (lanes steps with drafts)."""
    max_seq = rt.generator.backend.max_seq
    prompts = [(base * 100)[:max_seq - room] for base in ([7, 8, 9], [3, 4], [11, 12, 13, 14])]
    configs = [GenerationConfig(max_new_tokens=room, ignore_eos=True),
               GenerationConfig(max_new_tokens=room, ignore_eos=True, context_drafts=False),
               GenerationConfig(max_new_tokens=room, ignore_eos=True, temperature=0.9, seed=5)]
    if not together:
        prompts, configs = prompts[:1], configs[:1]
    ends = [Ends() for _ in prompts]
    engine = Engine(rt.generator, max_num_seqs=SEQS, max_num_batched_tokens=16)
    try:
        for p, c, e in zip(prompts, configs, ends):
            engine.add(p, c, e.sink)
        while engine.step():
            pass
    finally:
        engine.close()
    for p, c, e in zip(prompts, configs, ends):
        got = e.ends[0]
        alone = rt.generator.generate(p, replace(c, medusa=False))
        assert (got.new_tokens, got.finish_reason) == (room, "length"), (room, c)
        assert got.token_ids == alone.token_ids
