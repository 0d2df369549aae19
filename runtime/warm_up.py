"""Every kind of engine step run once before requests arrive (`serve`, Ray Serve replicas, benchmarks).

    seconds = warm_up(engine)             # an engine no request has reached yet (the server's own)
    seconds = warm_up_backend(generator)  # on a temporary engine: the backend's graphs open and run once

Each graph opens at its first use and its first run is slow (the default model: ~1.7 s to open one), which would
otherwise land on whichever request, or benchmark row, first needs that kind of step.
"""

from __future__ import annotations

import time

from .generation_config import GenerationConfig
from .engine import Engine
from .generator import Generator
from .speculation import Speculation, StepCost


class _WarmUpSpeculation(Speculation):
    """The warm-up's measurements, kept apart from the backend's, and the heads' tree for every request that asks
    for it (the real one gives it only where the heads are expected to pay)."""

    def __init__(self) -> None:
        super().__init__()  # step costs that never ask for a step without drafts: the steps run the graphs' shapes
        self.alone_cost = {True: StepCost(plain_steps=False), False: StepCost(plain_steps=False)}
        self.batched_cost = StepCost(plain_steps=False)

    def heads_for(self, tree):
        return tree

    def heads_without_drafts(self, tree):
        return tree


def warm_up(engine: Engine) -> float:
    """Batched steps, and a sequence alone with and without the heads, once each on ``engine``; seconds taken. What
    they measured (acceptance, step costs of first runs) is not kept and no step is reported. Call it before the
    engine is shared (no request submitted, no other thread stepping it): it swaps the generator's speculation
    state while it runs."""
    if not engine.idle:
        raise RuntimeError("warm_up() is for an engine no request has reached yet")
    gen = engine.gen
    # One token: fits any capacity. The answers (up to 4 tokens, EOS or not) are thrown away.
    spec, prompt = gen.spec, [0]
    t0, on_step, engine.on_step = time.perf_counter(), engine.on_step, None
    gen.spec = _WarmUpSpeculation()  # the heads' tree whenever asked: the Medusa graph must run too
    gen.spec.corpus = spec.corpus
    failed: list[Exception] = []
    sink = lambda item: failed.append(item) if isinstance(item, Exception) else None  # noqa: E731
    try:
        # Two together (batched steps, or one after the other without a lanes graph); the longer one ends alone
        # without the heads; a third runs alone with them.
        for batch in ([(2, True), (4, False)], [(3, True)]):
            for tokens, medusa in batch:
                engine.add(prompt, GenerationConfig(max_new_tokens=tokens, medusa=medusa, ignore_eos=True), sink)
            while engine.step():
                pass
    except BaseException as e:  # a step itself failed: its requests leave, so the engine is idle again
        with engine.lock:
            engine.waiting.clear()
        engine.fail(e)
        raise
    finally:
        engine.on_step, gen.spec = on_step, spec
    if failed:
        raise failed[0]
    return time.perf_counter() - t0


def warm_up_backend(generator: Generator) -> float:
    """`warm_up` on a temporary engine of the backend's default size, closed after; seconds taken."""
    engine = Engine(generator)
    try:
        return warm_up(engine)
    finally:
        engine.close()
