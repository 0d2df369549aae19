"""The warm-up `serve`, Ray Serve replicas and the benchmarks run before requests: every kind of engine step once
(the graphs open then, not on the first request that needs them), nothing it measured kept."""

from __future__ import annotations

import pytest

from medusa_export.runtime import warm_up as warm_up_module
from medusa_export.runtime.decode import GenerationConfig
from medusa_export.runtime.engine import Engine
from medusa_export.runtime.generator import GenerationResult
from medusa_export.runtime.warm_up import warm_up, warm_up_backend

pytest.importorskip("onnxruntime")
PROMPTS = [[5, 17, 3, 9, 40], [11] * 30, [7, 8]]
CONFIGS = [GenerationConfig(max_new_tokens=24, medusa=bool(i % 2), ignore_eos=True) for i in range(len(PROMPTS))]


def test_warm_up_runs_every_kind_of_step_before_requests_arrive(artifact, monkeypatch):
    """Batched steps and a sequence alone with and without the heads run once (the vanilla graph opens then); what
    they measured is forgotten, no step is reported, every slot is free again, and requests afterwards get their
    answers alone. A busy engine is refused; a step that raises leaves the engine idle and the state as it was."""
    from medusa_export.runtime.api import MedusaRuntime

    with MedusaRuntime.load(artifact, threads=1) as rt:
        backend = rt.generator.backend
        assert set(backend.sessions) == {"medusa"}  # the other one-sequence graph opens at its first use
        steps = []
        engine = Engine(rt.generator, on_step=steps.append)
        assert engine.max_num_seqs > 1  # the artifact has a lanes graph: batched steps are warmed too
        before = rt.generator.spec
        warmed = []

        class Recorded(warm_up_module._WarmUpSpeculation):
            def __init__(self) -> None:
                super().__init__()
                warmed.append(self)

        monkeypatch.setattr(warm_up_module, "_WarmUpSpeculation", Recorded)
        assert warm_up(engine) > 0
        assert set(backend.sessions) == {"medusa", "vanilla"} and engine.idle and steps == []
        (spec,) = warmed  # a batched step, and one-sequence steps on both graphs (the Medusa one with its tree)
        assert spec.batched_cost.measured and spec.alone_cost[True].measured and spec.alone_cost[False].measured
        assert any(spec.alone_cost[True].count[2:])  # the tree's shape ran, not only the root alone
        assert rt.generator.spec is before and not before.batched_cost.measured and before.requests == 0
        assert sorted(engine.free) == list(range(engine.max_num_seqs))
        finals = {}
        for i, (prompt, cfg) in enumerate(zip(PROMPTS, CONFIGS)):
            engine.add(prompt, cfg,
                       lambda x, i=i: finals.__setitem__(i, x) if isinstance(x, GenerationResult) else None)
        for _ in range(500):
            if not engine.step():
                break
        assert [finals[i].token_ids for i in range(len(PROMPTS))] == \
            [rt.generator.generate(p, c).token_ids for p, c in zip(PROMPTS, CONFIGS)]
        assert len(steps) > 0
        engine.add(PROMPTS[0], CONFIGS[0], lambda x: None)
        with pytest.raises(RuntimeError, match="no request has reached"):
            warm_up(engine)
        engine.close()
        failing = Engine(rt.generator)

        def boom() -> None:
            raise RuntimeError("no slot")

        monkeypatch.setattr(failing, "_admit", boom)
        with pytest.raises(RuntimeError, match="no slot"):
            warm_up(failing)
        assert failing.idle and rt.generator.spec is before  # left as it was: warm_up may be called again
        monkeypatch.undo()
        assert warm_up(failing) > 0
        failing.close()


def test_warm_up_backend_opens_every_graph_on_a_temporary_engine(artifact):
    """What `bench` and `scripts/compare_peers.py` call before their rows: the graphs open, the engine it made is
    closed, the backend's speculation state is untouched."""
    from medusa_export.runtime.api import MedusaRuntime

    with MedusaRuntime.load(artifact, threads=1) as rt:
        before = rt.generator.spec
        assert warm_up_backend(rt.generator) > 0
        assert set(rt.generator.backend.sessions) == {"medusa", "vanilla"} and rt.generator.backend.lanes is not None
        assert rt.generator.spec is before and not before.batched_cost.measured
