"""A seeded, bounded random search for answers that depend on what shares their batch: requests of every kind
(greedy with the heads' tree and context drafts, greedy plain, sampled; stop strings drawn across token boundaries,
end-of-sequence on or ignored, budgets past the KV capacity, one-token prompts, prompts one short of the maximum,
prompts that repeat themselves) join the engine at random steps, some cancelled mid-batch. Every greedy answer must be
vanilla decoding's alone (tokens, text, finish reason), every sampled one `generate(medusa=False)`'s with its seed, and
every stream's events must add up to its result."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from conftest import TINY_VOCAB, ClockFreeCost

from medusa_export.runtime.decode import GenerationConfig
from medusa_export.runtime.engine import Engine
from medusa_export.runtime.text_output import StreamEvent

pytest.importorskip("onnxruntime")
ROUNDS, SEED = 12, 20261206


@pytest.fixture(scope="module")
def rt(artifact):
    from medusa_export.runtime.api import MedusaRuntime

    with MedusaRuntime.load(artifact, threads=1) as runtime:
        yield runtime


def _prompt(r: random.Random, max_seq: int) -> list[int]:
    kind = r.random()
    if kind < 0.15:
        return [r.randrange(1, TINY_VOCAB - 1)]
    if kind < 0.25:
        return [r.randrange(1, TINY_VOCAB - 1) for _ in range(max_seq - r.choice([1, 2, 5]))]
    if kind < 0.6:  # repeats itself: long context drafts
        return ([r.randrange(1, TINY_VOCAB - 1) for _ in range(r.randint(2, 5))] * 12)[:r.randint(3, 40)]
    return [r.randrange(1, TINY_VOCAB - 1) for _ in range(r.randint(2, 30))]


def _config(r: random.Random, rt, prompt: list[int], greedy: bool) -> GenerationConfig:
    cfg = GenerationConfig(max_new_tokens=r.randint(1, 140), ignore_eos=r.random() < 0.5)
    if greedy:
        cfg = replace(cfg, medusa=r.random() < 0.8, context_drafts=r.random() < 0.85)
    else:
        cfg = replace(cfg, temperature=r.choice([0.5, 1.0, 2.0]), seed=r.randrange(1000), medusa=r.random() < 0.5)
    if r.random() < 0.4:  # a stop string from the answer itself, often spanning tokens
        text = rt.generator.generate(prompt, replace(cfg, medusa=False)).text
        if len(text) > 2:
            start = r.randrange(len(text) - 1)
            cfg = replace(cfg, stop_strings=(text[start:start + r.randint(1, 9)],))
    return cfg


def _run(rt, requests: list[tuple], budget: int) -> tuple[dict, dict]:
    """Requests ``(prompt, cfg, arrival step, cancel step or None)`` through one engine: {i: result}, {i: events}."""
    finals, events = {}, {i: [] for i in range(len(requests))}
    engine = Engine(rt.generator, max_num_seqs=3, max_num_batched_tokens=budget)
    added, n = {}, 0

    def sink(i, item):
        (events[i].append if isinstance(item, StreamEvent) else lambda x: finals.__setitem__(i, x))(item)

    try:
        while len(added) < len(requests) or not engine.idle:
            for i, (prompt, cfg, arrival, _) in enumerate(requests):
                if i not in added and arrival <= n:
                    added[i] = engine.add(prompt, cfg, lambda item, i=i: sink(i, item))
            for i, seq in added.items():
                if requests[i][3] == n:
                    engine.cancel(seq)
            engine.step()
            n += 1
            assert n < 3000
    finally:
        engine.close()
    return finals, events


def test_no_answer_depends_on_what_shares_its_batch(rt):
    r = random.Random(SEED)
    seen = set()  # what the search reached: it must keep reaching it
    measured, rt.generator.spec.batched_cost = rt.generator.spec.batched_cost, ClockFreeCost(0.0)  # drafts pay
    try:
        for round_ in range(ROUNDS):
            requests = []
            for _ in range(r.randint(2, 5)):
                prompt, greedy, arrival = _prompt(r, rt.generator.backend.max_seq), r.random() < 0.75, r.randint(0, 8)
                cancel = arrival + r.randint(1, 6) if r.random() < 0.15 else None
                requests.append((prompt, _config(r, rt, prompt, greedy), arrival, cancel))
            finals, events = _run(rt, requests, r.choice([3, 8, 64]))
            for i, (prompt, cfg, _, cancel) in enumerate(requests):
                got = finals[i]
                where = f"round {round_} request {i}: {len(prompt)}-token prompt, {cfg}"
                assert "".join(e.text for e in events[i]) == got.text, where
                assert [t for e in events[i] for t in e.token_ids] == got.token_ids, where
                if cancel is not None and got.finish_reason == "abort":
                    seen.add("cancelled")
                    continue
                seen |= {got.finish_reason} | ({"kv limit"} if got.finish_reason == "length" and
                                                got.new_tokens < cfg.max_new_tokens else set())
                seen |= {"stop string"} if cfg.stop_strings and got.finish_reason == "stop" else set()
                seen |= {"drafts accepted"} if got.accepted_context else set()
                alone = rt.generator.generate(prompt, replace(cfg, medusa=False))
                assert (got.token_ids, got.text, got.finish_reason) == \
                    (alone.token_ids, alone.text, alone.finish_reason), where
                if cfg.temperature == 0 and cfg.medusa:  # and greedy Medusa alone, with the heads' tree
                    tree = rt.generator.generate(prompt, cfg, heads=True)
                    assert (tree.token_ids, tree.text, tree.finish_reason) == \
                        (alone.token_ids, alone.text, alone.finish_reason), where
    finally:
        rt.generator.spec.batched_cost = measured
    assert seen >= {"cancelled", "stop", "length", "kv limit", "stop string", "drafts accepted"}, seen
