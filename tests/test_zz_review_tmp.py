"""Review scratch: prefix reuse exactness across fused-graph variants (rows and answers)."""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest

from conftest import build_tiny

from medusa_export.runtime.decode import GenerationConfig, feed
from medusa_export.runtime.generator import GenerationResult

VARIANTS = {
    "fp32-gqa": {},
    "fp32-kernel": {"attention": "kernel"},
    "int8-blocks": {"dtype": "int8"},
    "int4-blocks": {"dtype": "int4"},
    "int8-rows16": {"dtype": "int8", "attention": "kernel", "int8_matmul": "rows16"},
    "kv-fp16": {"attention": "kernel", "kv_cache_dtype": "fp16"},
    "int4-kv-fp16": {"dtype": "int4", "attention": "kernel", "kv_cache_dtype": "fp16"},
    "fp16": {"dtype": "fp16"},
}
WANT = os.environ.get("REVIEW_VARIANTS", ",".join(VARIANTS)).split(",")


@pytest.fixture(scope="module", params=WANT)
def rt(request, tiny_dirs, tmp_path_factory):
    from medusa_export.runtime.api import MedusaRuntime

    try:
        art = build_tiny(tiny_dirs, tmp_path_factory.mktemp("rv") / request.param, max_seq=128,
                         **VARIANTS[request.param])
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"build {request.param}: {type(e).__name__}: {str(e)[:300]}")
    with MedusaRuntime.load(art, threads=int(os.environ.get("REVIEW_THREADS", "1"))) as runtime:
        print("VARIANT", request.param, "reuses_rows", runtime.generator.backend.reuses_rows)
        yield runtime


def _through(engine, requests):
    results = {}
    for i, (prompt, cfg) in enumerate(requests):
        engine.add(prompt, cfg, lambda item, i=i: results.__setitem__(i, item) if isinstance(
            item, (GenerationResult, Exception)) else None)
    for _ in range(5000):
        if not engine.step():
            break
    assert all(isinstance(results.get(i), GenerationResult) for i in range(len(requests))), results
    return [results[i] for i in range(len(requests))]


def _rows(session):
    kv = session.kv
    return kv.store[:, 0, :, :kv.length].copy()


def _prefilled(backend, tokens, medusa, chunk=None):
    s = backend.new_session()
    cfg = GenerationConfig()
    chunk = chunk or len(tokens)
    for i in range(0, len(tokens), chunk):
        feed(s, tokens[i:i + chunk], medusa, cfg)
    return _rows(s)


def _cmp(name, a, b):
    same = a.shape == b.shape and np.array_equal(a, b)
    diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.shape == b.shape else -1
    print(f"  {name}: exact={same} maxdiff={diff:.3g} shape={a.shape}")
    return same


REP = [3, 8, 5, 9, 12, 4, 7, 3, 8, 5, 9, 12, 4, 7, 3, 8, 5]


def test_rows_left_by_requests_equal_a_fresh_prefill(rt, clock_free_steps):
    from medusa_export.runtime.engine import Engine

    backend = rt.generator.backend
    ok = True
    for seqs, reqs in ((1, [(REP, GenerationConfig(max_new_tokens=30, ignore_eos=True))]),
                       (2, [(REP, GenerationConfig(max_new_tokens=30, ignore_eos=True)),
                            ([5, 6, 7, 8, 9, 10, 11, 12, 13, 14], GenerationConfig(max_new_tokens=30, ignore_eos=True,
                                                                                    medusa=False))]),
                       (1, [(REP, GenerationConfig(max_new_tokens=30, ignore_eos=True, temperature=0.8, seed=3))])):
        engine = Engine(rt.generator, max_num_seqs=seqs, max_num_batched_tokens=8)
        try:
            _through(engine, reqs)
            for slot in range(seqs):
                tokens = engine.prefixes.tokens[slot]
                if not tokens:
                    continue
                got = _rows(engine.slots[slot])
                print("slot", slot, "rows", len(tokens), "seqs", seqs)
                for medusa in (False, True):
                    for chunk in (None, 5, 1):
                        ok &= _cmp(f"medusa={medusa} chunk={chunk}", got, _prefilled(backend, tokens, medusa, chunk))
        finally:
            engine.close()
    assert ok


CONFIGS = {
    "greedy-medusa": GenerationConfig(max_new_tokens=24, ignore_eos=True, logprobs=2),
    "greedy-plain": GenerationConfig(max_new_tokens=24, ignore_eos=True, logprobs=2, medusa=False),
    "sampled": GenerationConfig(max_new_tokens=24, ignore_eos=True, logprobs=2, temperature=0.9, seed=7),
}


def _same(got, fresh):
    return got.token_ids == fresh.token_ids and [(e.token_id, e.logprob, e.top) for e in got.logprobs] == \
        [(e.token_id, e.logprob, e.top) for e in fresh.logprobs]


def _fresh(rt, prompt, cfg):
    return rt.generator.generate(prompt, cfg if cfg.temperature == 0 else replace(cfg, medusa=False))


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_follow_ups_answer_as_fresh(rt, kind, clock_free_steps):
    from medusa_export.runtime.engine import Engine

    cfg = CONFIGS[kind]
    engine = Engine(rt.generator, max_num_seqs=2, max_num_batched_tokens=8)
    bad = []
    try:
        prompt = list(REP)
        for turn in range(3):
            (got,) = _through(engine, [(prompt, cfg)])
            if not _same(got, _fresh(rt, prompt, cfg)):
                bad.append(turn)
            print(kind, "turn", turn, "cached", got.cached_tokens)
            prompt = prompt + got.token_ids + [turn + 20, 6, 11]
        # the same prompt again (+ all its answer: the slot holds all but its last token)
        (got,) = _through(engine, [(prompt, cfg)])
        again = prompt + got.token_ids
        (got2,) = _through(engine, [(again, cfg)])
        print(kind, "again cached", got2.cached_tokens, len(again))
        if not _same(got2, _fresh(rt, again, cfg)):
            bad.append("again")
    finally:
        engine.close()
    assert not bad, bad


def test_random_workload_keeps_slot_rows_true_and_answers_fresh(rt, clock_free_steps):
    from medusa_export.runtime.engine import Engine

    backend = rt.generator.backend
    rng = np.random.default_rng(int(os.environ.get("REVIEW_SEED", "0")))
    engine = Engine(rt.generator, max_num_seqs=3, max_num_batched_tokens=8)
    checked, bad_rows = [0], []
    release = engine.prefixes.release

    def watched(slot, tokens):
        if tokens is not None and tokens:
            got = _rows(engine.slots[slot])
            want = _prefilled(backend, list(tokens), False)
            if not (got.shape == want.shape and np.array_equal(got, want)):
                bad_rows.append((slot, len(tokens), got.shape, want.shape))
            checked[0] += 1
        return release(slot, tokens)

    engine.prefixes.release = watched
    history = [[3, 8, 5, 9, 12, 4, 7]]
    results, reqs, bad = {}, {}, []
    stats_seen = []
    try:
        for rnd in range(25):
            for j in range(int(rng.integers(1, 4))):
                base = history[int(rng.integers(len(history)))]
                cut = int(rng.integers(1, len(base) + 1))
                prompt = base[:cut] + rng.integers(2, 60, int(rng.integers(0, 12))).tolist()
                prompt = prompt[-118:] if len(prompt) > 118 else prompt
                if not prompt:
                    prompt = [5]
                if rng.random() < 0.15:
                    prompt = (prompt * 20)[:int(rng.integers(100, 120))]  # near capacity: ends with "length"
                kind = ["greedy-medusa", "greedy-plain", "sampled"][int(rng.integers(3))]
                cfg = replace(CONFIGS[kind], max_new_tokens=int(rng.integers(1, 30)), ignore_eos=bool(rng.random() < .7))
                if rng.random() < 0.1:
                    cfg = replace(cfg, prompt_logprobs=1)
                key = (rnd, j)
                seq = engine.add(prompt, cfg, lambda item, key=key: results.__setitem__(key, item) if isinstance(
                    item, (GenerationResult, Exception)) else None)
                reqs[key] = (prompt, cfg, seq)
            cancel_at = int(rng.integers(0, 6)) if rng.random() < 0.3 else None
            for k in range(5000):
                if cancel_at is not None and k == cancel_at:
                    live = [s for (_, _, s) in reqs.values() if s.session is not None or s in engine.waiting]
                    if live:
                        engine.cancel(live[int(rng.integers(len(live)))])
                if not engine.step():
                    break
            for key, (prompt, cfg, seq) in list(reqs.items()):
                r = results.get(key)
                if isinstance(r, GenerationResult):
                    history.append(prompt + r.token_ids)
                    stats_seen.append((r.cached_tokens > 0, r.finish_reason))
                    if r.finish_reason != "abort":
                        fresh = _fresh(rt, prompt, cfg)
                        if not (_same(r, fresh) and r.finish_reason == fresh.finish_reason):
                            bad.append((key, len(prompt), r.cached_tokens, r.token_ids[:8], fresh.token_ids[:8]))
                else:
                    bad.append((key, "no result", r))
                del reqs[key]
    finally:
        engine.close()
    from collections import Counter
    print(Counter(stats_seen))
    print("checked releases", checked[0], "bad rows", bad_rows, "bad answers", bad)
    assert not bad_rows and not bad
