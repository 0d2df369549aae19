"""The batched engine: each answer is exactly what it is alone, whatever shares the step, whenever it joined,
Medusa on or off, on every weight dtype; sequences that end free their slot at the next step and leave the others
unchanged; a backend failure ends the affected requests with an error, not the engine; prompts are fed in chunks
within the token budget, so a long prompt never stalls the running streams."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ClockFreeCost, artifact_tree_file, make_chat_tokenizer

from medusa_export.runtime.build_options import BuildOptions
from medusa_export.runtime.decode import GenerationConfig
from medusa_export.runtime.engine import Engine
from medusa_export.runtime.generator import GenerationResult

pytest.importorskip("onnxruntime")
LANES = 3
RNG = np.random.default_rng(11)
PROMPTS = [RNG.integers(1, 300, n).tolist() for n in (5, 30, 2, 12, 47, 3)]


@pytest.fixture(scope="module")
def engine_root(tmp_path_factory):
    return tmp_path_factory.mktemp("engine")


def build_runtimes(tiny_dirs, root, dtypes=("fp32", "int8", "int4"), int8: dict | None = None,
                   int4: dict | None = None, **options) -> dict:
    """The tiny model with a chat tokenizer, built with a 3-lane batched graph for each of ``dtypes`` (artifacts in
    ``root / dtype``; ``options``: more `BuildOptions`, ``tree`` among them replacing the tests' tree; ``int8`` /
    ``int4``: more for that build only), loaded."""
    import shutil

    from medusa_export.exporter.build import build_artifact
    from medusa_export.runtime.api import MedusaRuntime

    shutil.copytree(tiny_dirs[0], root / "model")
    make_chat_tokenizer().save(root / "model")
    tree = options.pop("tree", None) or artifact_tree_file(tiny_dirs)  # a JSON file of `medusa_choices`
    out = {}
    for dtype in dtypes:
        extra = {**options, **({"int8": int8, "int4": int4}.get(dtype) or {})}
        build_artifact(str(root / "model"), root / dtype,
                       BuildOptions(heads=str(tiny_dirs[1]), tree=tree, max_seq=256,
                                    dtype=dtype, max_num_seqs=LANES, **extra), log=lambda _m: None)
        out[dtype] = MedusaRuntime.load(root / dtype, threads=1)
    return out


@pytest.fixture(scope="module")
def runtimes(tiny_dirs, engine_root):
    return build_runtimes(tiny_dirs, engine_root)


def _config(i: int, medusa: bool | None = None, n: int = 24) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, medusa=bool(i % 2) if medusa is None else medusa, ignore_eos=True)


def _alone(rt, prompts, configs) -> list[list[int]]:
    return [rt.generator.generate(p, c).token_ids for p, c in zip(prompts, configs)]


def _engine_run(rt, prompts, configs, arrivals: list[int], budget: int = 16, **kw) -> tuple[dict, list]:
    """Run the engine, adding request i at step ``arrivals[i]``; returns {i: final item} and the step records. Its
    lanes steps weigh drafts by fixed step costs, not measured ones: whether a short run verifies any draft would
    otherwise depend on how busy the machine is."""
    finals, steps = {}, []
    engine = Engine(rt.generator, max_num_seqs=LANES, max_num_batched_tokens=budget,
                    on_step=steps.append, **kw)
    pending = sorted(range(len(prompts)), key=lambda i: arrivals[i])
    n = 0
    measured, rt.generator.spec.batched_cost = rt.generator.spec.batched_cost, ClockFreeCost()
    try:
        while pending or not engine.idle:
            while pending and arrivals[pending[0]] <= n:
                i = pending.pop(0)
                engine.add(prompts[i], configs[i], lambda x, i=i: finals.__setitem__(i, x)
                           if isinstance(x, (GenerationResult, Exception)) else None)
            engine.step()
            n += 1
            assert n < 5000  # bounded
    finally:
        rt.generator.spec.batched_cost = measured
    return finals, steps


@pytest.mark.parametrize("dtype", ["fp32", "int8", "int4"])
def test_every_answer_equals_its_answer_alone(runtimes, dtype):
    """Six requests, three lanes, staggered arrivals, Medusa on for half of them: every sequence's tokens equal its
    tokens decoded alone (and alone, greedy Medusa equals greedy vanilla)."""
    rt = runtimes[dtype]
    configs = [_config(i) for i in range(len(PROMPTS))]
    alone = _alone(rt, PROMPTS, configs)
    vanilla = _alone(rt, PROMPTS, [_config(i, medusa=False) for i in range(len(PROMPTS))])
    assert alone == vanilla
    finals, steps = _engine_run(rt, PROMPTS, configs, arrivals=[0, 0, 3, 5, 5, 40])
    assert [finals[i].token_ids for i in range(len(PROMPTS))] == alone
    assert max(s.sequences for s in steps) == LANES and any(s.speculative for s in steps)
    assert all(finals[i].finish_reason == "length" for i in finals)


REPEATING = [[7, 8, 9, 10] * 4, [3, 4] * 6, PROMPTS[1] * 2, PROMPTS[3] + PROMPTS[3][:6]]


@pytest.mark.parametrize("dtype", ["fp32", "int8", "int4"])
def test_context_drafts_in_batched_steps_change_no_answer(runtimes, dtype):
    """Greedy sequences verify context drafts in the lanes steps (the prompts repeat, and so does the tiny model):
    every answer equals plain greedy decoding alone, and drafts were accepted while others shared the step."""
    rt = runtimes[dtype]
    configs = [_config(0, medusa=True, n=32)] * len(REPEATING)
    vanilla = _alone(rt, REPEATING, [_config(0, medusa=False, n=32)] * len(REPEATING))
    finals, steps = _engine_run(rt, REPEATING, configs, arrivals=[0, 0, 2, 9])
    assert [finals[i].token_ids for i in range(len(REPEATING))] == vanilla
    assert any(s.speculative and s.sequences > 1 for s in steps)
    assert sum(finals[i].accepted_context for i in finals) > 0


def _lanes_step(backend, lanes, feeds, outputs, temperature: float = 0.8):
    """One ``lanes`` step of fresh sequences: ``feeds[i]`` with ``Lane.outputs`` ``outputs[i]``, in lanes 0.."""
    from medusa_export.runtime.backends.lanes import Lane

    sessions = [backend.new_session() for _ in feeds]
    outs = lanes.run([Lane(s, f, temperature, o) for s, f, o in zip(sessions, feeds, outputs)])
    for s in sessions:
        s.close()
    return outs


@pytest.mark.parametrize("dtype", ["fp32", "int8", "int4"])
def test_a_lanes_step_computes_outputs_for_the_rows_asked_only(runtimes, dtype):
    """``Lane.outputs``: a prompt chunk asks for its last row (or none before its last chunk); those rows equal,
    bit for bit, the same rows of a step that computes every row, whatever the others ask, down to a step with a
    single row asked (int4: padded to two rows for the tail's matmuls) and one with none."""
    backend = runtimes[dtype].generator.backend
    assert backend.lanes.selects_rows
    feeds = [np.asarray(PROMPTS[1][:9], np.int64), np.asarray(PROMPTS[3], np.int64), np.asarray([7], np.int64)]
    full = _lanes_step(backend, backend.lanes, feeds, [None, None, None])
    for outputs in ([1, None, None], [1, 0, 1], [0, 1, 0], [0, 0, 0], [3, 2, 0]):
        for out, whole, n in zip(_lanes_step(backend, backend.lanes, feeds, outputs), full, outputs):
            rows = len(whole.next_ids) if n is None else n
            assert len(out.next_ids) == rows
            for name in ("next_ids", "next_probs", "entropy"):
                np.testing.assert_array_equal(getattr(out, name), getattr(whole, name)[len(whole.next_ids) - rows:])


def test_a_lanes_graph_without_row_selection_still_runs(runtimes, engine_root, tmp_path):
    """Artifacts built before ``output_rows``: their lanes graph computes every row and the runtime hands each lane
    the rows it asked for, equal to a selecting graph's."""
    import onnx
    import onnxruntime as ort

    from medusa_export.runtime.backends.ort_lanes import OrtLanes

    backend = runtimes["fp32"].generator.backend
    model = onnx.load(str(engine_root / "fp32" / "lanes.onnx"))
    gather = next(n for n in model.graph.node if n.name == "output_rows/gather")
    gather.op_type, gather.input[:] = "Identity", gather.input[:1]
    del gather.attribute[:]
    model.graph.input.remove(next(i for i in model.graph.input if i.name == "output_rows"))
    onnx.save(model, str(tmp_path / "old_lanes.onnx"))
    old = OrtLanes(ort.InferenceSession(str(tmp_path / "old_lanes.onnx"), providers=["CPUExecutionProvider"]),
                   backend.dims, LANES)
    assert not old.selects_rows
    feeds, outputs = [np.asarray(PROMPTS[1][:9], np.int64), np.asarray([7, 8], np.int64)], [1, None]
    runs = [_lanes_step(backend, lanes, feeds, outputs) for lanes in (old, backend.lanes)]
    for a, b in zip(*runs):
        assert len(a.next_ids) == len(b.next_ids)
        np.testing.assert_array_equal(a.next_probs, b.next_probs)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arrivals=st.lists(st.integers(0, 30), min_size=4, max_size=4), budget=st.integers(LANES, 40),
       medusa=st.lists(st.booleans(), min_size=4, max_size=4))
def test_any_schedule_gives_the_same_answers(runtimes, arrivals, budget, medusa):
    rt = runtimes["fp32"]
    prompts = PROMPTS[1:5]
    configs = [_config(i, m, n=16) for i, m in enumerate(medusa)]
    finals, steps = _engine_run(rt, prompts, configs, arrivals, budget=budget)
    assert [finals[i].token_ids for i in range(4)] == _alone(rt, prompts, configs)
    assert all(s.rows <= budget for s in steps if s.sequences > 1)


def test_prompts_are_fed_in_chunks_and_running_streams_get_a_token_every_step(runtimes):
    """A 47-token prompt arrives while two sequences decode: every batched step stays within the budget of 8
    rows, and each running stream gets its token at every step while the prompt goes in, chunk by chunk."""
    rt = runtimes["fp32"]
    configs = [_config(0, medusa=False, n=40), _config(1, medusa=False, n=40), _config(2, medusa=False, n=4)]
    tokens_seen = {0: [], 1: []}
    finals, steps = {}, []
    engine = Engine(rt.generator, max_num_seqs=LANES, max_num_batched_tokens=8,
                    on_step=steps.append)
    for i, p in enumerate(PROMPTS[:2]):
        engine.add(p, configs[i], lambda x, i=i: tokens_seen[i].append(len(x.token_ids))
                   if hasattr(x, "text") and not isinstance(x, GenerationResult) else finals.__setitem__(i, x))
    for _ in range(5):
        engine.step()
    before = [len(tokens_seen[0]), len(tokens_seen[1])]
    engine.add(PROMPTS[4], configs[2], lambda x: finals.__setitem__(2, x) if isinstance(x, GenerationResult) else None)
    chunk_steps = 0
    while 2 not in finals:
        engine.step()
        chunk_steps += 1
    assert chunk_steps >= 47 // 6  # the prompt took several steps: 6 rows a step beside two decoding streams
    assert [len(tokens_seen[0]), len(tokens_seen[1])] == [b + chunk_steps for b in before]  # one token per step each
    assert all(s.rows <= 8 for s in steps)


def test_ended_sequences_free_their_slot_and_leave_the_others_unchanged(runtimes):
    """One request stops on a stop string, one is cancelled mid-way (a disconnect), one has a short budget: the
    queued ones take their slots at the next step, and every other answer is exactly its answer alone."""
    rt = runtimes["fp32"]
    tok = rt.generator.tokenizer
    configs = [_config(i, n=20) for i in range(len(PROMPTS))]
    alone = _alone(rt, PROMPTS, configs)
    stop_word = tok.decode(alone[0][5:6]).strip()
    configs[0] = GenerationConfig(max_new_tokens=20, stop_strings=(stop_word,), ignore_eos=True)
    configs[2] = _config(2, n=3)
    finals, order = {}, []
    engine = Engine(rt.generator, max_num_seqs=LANES, max_num_batched_tokens=32)
    seqs = []
    for i, p in enumerate(PROMPTS):
        def sink(x, i=i):
            if isinstance(x, (GenerationResult, Exception)):
                finals[i] = x
                order.append(i)
        seqs.append(engine.add(p, configs[i], sink))
    for _ in range(3):
        engine.step()
    assert seqs[1].session is not None and 1 not in finals
    engine.cancel(seqs[1])
    engine.step()
    assert seqs[1].session is None and finals[1].finish_reason == "abort"  # its slot is free at the next step
    while engine.step():
        assert len(engine.running) + len(engine.free) == LANES
    assert finals[0].finish_reason == "stop" and stop_word not in finals[0].text
    assert finals[2].finish_reason == "length" and len(finals[2].token_ids) == 3
    for i in (3, 4, 5):
        assert finals[i].token_ids == alone[i], i
    assert len(engine.free) == LANES  # every slot back


def test_a_backend_failure_ends_its_requests_not_the_engine(runtimes, monkeypatch):
    rt = runtimes["fp32"]
    lanes = rt.generator.backend.lanes
    real = lanes.run
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("ONNX Runtime: out of memory")
        return real(batch)

    monkeypatch.setattr(lanes, "run", flaky)
    configs = [_config(0, medusa=False, n=8)] * 4
    finals, _ = _engine_run(rt, PROMPTS[:4], configs, arrivals=[0, 0, 0, 50])
    failed = [i for i in finals if isinstance(finals[i], Exception)]
    assert failed and all("out of memory" in str(finals[i]) for i in failed)
    assert 3 not in failed and finals[3].token_ids == _alone(rt, PROMPTS[3:4], configs[3:4])[0]


def test_requests_that_cannot_fit_are_refused_before_they_take_a_slot(runtimes):
    from medusa_export.runtime.errors import InputError

    rt = runtimes["fp32"]
    engine = Engine(rt.generator, max_num_seqs=2)
    with pytest.raises(InputError, match="maximum sequence is 256"):
        engine.add(list(range(1, 257)), GenerationConfig(max_new_tokens=1), lambda x: None)
    assert engine.idle and len(engine.free) == 2
    with pytest.raises(InputError, match=r"max_num_seqs 4 \(--max-num-seqs\) exceeds the "
                       r"artifact's batched steps \((\d+) lanes\): use at most \1, or rebuild"):
        Engine(rt.generator, max_num_seqs=4)
    for bad in ({"max_num_seqs": 0}, {"max_num_seqs": -1}, {"max_num_seqs": "2"}, {"max_num_batched_tokens": None}):
        with pytest.raises(InputError, match="must be an integer >= 1"):  # -1 made no slots: step() spun forever
            Engine(rt.generator, **bad)


def test_an_answer_reaching_the_end_of_the_cache_ends_there_as_alone(runtimes):
    """As `generate` does (finish reason "length"), not refused: the server refuses such requests itself."""
    rt = runtimes["fp32"]
    cfg = GenerationConfig(max_new_tokens=250, medusa=False, ignore_eos=True)
    alone = rt.generator.generate(PROMPTS[4], cfg)
    batched = rt.generate_many([PROMPTS[4], PROMPTS[0]], max_new_tokens=250, medusa=False, ignore_eos=True)[0]
    assert alone.finish_reason == batched.finish_reason == "length" and batched.token_ids == alone.token_ids


def test_library_batching_gives_the_answers_alone(runtimes):
    """`generate_many` and a `batcher` fed from several threads: every result equals `generate` alone."""
    import threading

    rt = runtimes["int8"]
    opts = dict(max_new_tokens=12, ignore_eos=True)
    alone = [rt.generate(p, **opts).token_ids for p in PROMPTS]
    assert [r.token_ids for r in rt.generate_many(PROMPTS, **opts)] == alone
    assert [r.token_ids for r in rt.generate_many(PROMPTS, max_num_seqs=2, medusa=False, **opts)] == alone
    got = {}
    with rt.batcher() as batcher:
        def client(i):
            stream = batcher.submit(PROMPTS[i], **opts)
            tokens = [t for event in stream for t in event.token_ids]
            got[i] = (tokens, stream.result.token_ids)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert all(got[i] == (alone[i], alone[i]) for i in range(len(PROMPTS)))


def test_a_long_prompt_alone_goes_in_chunks_and_a_newcomer_joins_within_one(runtimes):
    """Alone, a 47-token prompt is fed in chunks of the budget (8 rows), so a request arriving meanwhile is decoding
    before that prefill ends, instead of waiting for all of it; both answers are their answers alone."""
    rt = runtimes["fp32"]
    configs = [_config(0, medusa=True, n=6), _config(1, medusa=False, n=6)]
    finals, steps = _engine_run(rt, [PROMPTS[4], PROMPTS[2]], configs, arrivals=[0, 2], budget=8)
    assert [s.rows for s in steps[:2]] == [8, 8] and all(s.sequences == 1 for s in steps[:2])
    assert steps[2].sequences == 2 and sum(s.rows for s in steps[:3]) < 47  # joined while the prompt went in
    assert [finals[i].token_ids for i in range(2)] == _alone(rt, [PROMPTS[4], PROMPTS[2]], configs)


def test_cancelled_requests_leave_the_queue_while_every_slot_is_busy(runtimes):
    """A request cancelled while queued (its client disconnected) gets its result at the next step, not when a
    slot frees: its place in a server's queue is released then."""
    rt = runtimes["fp32"]
    engine = Engine(rt.generator, max_num_seqs=LANES)
    finals = {}
    sink = lambda i: (lambda x: finals.__setitem__(i, x) if isinstance(x, GenerationResult) else None)  # noqa: E731
    for i in range(LANES):
        engine.add(PROMPTS[i], _config(i, n=40), sink(i))
    queued = engine.add(PROMPTS[3], _config(3, n=40), sink(3))
    engine.step()
    assert len(engine.running) == LANES and engine.waiting == [queued]
    engine.cancel(queued)
    engine.step()
    assert engine.waiting == [] and finals[3].finish_reason == "abort" and len(engine.running) == LANES


def test_a_request_failing_in_its_own_share_of_a_step_ends_alone(runtimes):
    """One sequence's acceptance raising (here a sampling request whose temperature was set below float32's range
    after validation: NaN probabilities, as a 1e-300 from a client once gave) ends that request with the error; the
    sequences sharing its steps carry on, each with its answer alone."""
    rt = runtimes["fp32"]
    configs = [_config(i, medusa=False, n=10) for i in range(3)]
    broken = GenerationConfig(max_new_tokens=10, temperature=0.7, seed=1, medusa=False)
    broken.temperature = 1e-300
    finals, _ = _engine_run(rt, PROMPTS[:3] + [PROMPTS[3]], configs + [broken], arrivals=[0, 0, 3, 0])
    assert isinstance(finals[3], Exception)
    assert [finals[i].token_ids for i in range(3)] == _alone(rt, PROMPTS[:3], configs)


def test_a_short_prompt_arriving_during_a_long_prefill_goes_in_at_once():
    """Prompts share a step's budget fairly: a 2-token prompt arriving while a 47-token one goes in 8 rows at a time
    took no row until the long one was in (its first token came after the whole long prefill)."""
    from medusa_export.runtime.prefill_shares import fair_shares

    assert fair_shares([40, 2], 8) == [6, 2] and fair_shares([40, 40], 8) == [4, 4]
    assert fair_shares([1, 1, 1], 3) == [1, 1, 1] and fair_shares([5, 3, 9], 4) == [1, 1, 2]
    assert fair_shares([3, 3, 3], 2) == [1, 1, 0]  # the latest waits, never the earliest


def test_the_newcomer_gets_its_first_token_before_the_long_prompt(runtimes):
    rt = runtimes["fp32"]
    configs = [_config(0, medusa=False, n=4), _config(1, medusa=False, n=4)]
    firsts = []
    engine = Engine(rt.generator, max_num_seqs=LANES, max_num_batched_tokens=8)
    finals = {}
    for i, p in enumerate([PROMPTS[4], PROMPTS[2]]):
        def sink(x, i=i):
            if isinstance(x, GenerationResult):
                finals[i] = x
            elif i not in firsts:
                firsts.append(i)
        engine.add(p, configs[i], sink)
        engine.step()  # the long prompt's first chunk goes in alone
    while engine.step():
        pass
    assert firsts == [1, 0]
    assert [finals[i].token_ids for i in range(2)] == _alone(rt, [PROMPTS[4], PROMPTS[2]], configs)


def test_the_fix_for_too_many_sequences_names_a_rebuild_only_where_it_adds_lanes():
    """`build` makes at most 64 lanes: asking 1,000 of an 8-lane artifact was told to rebuild with 1,000 (refused),
    and an artifact of 64 or more lanes was told to rebuild with as many or fewer."""
    from medusa_export.runtime.backends.lanes import MAX_BUILD_LANES, more_lanes_fix

    assert more_lanes_fix(8, 9) == "use at most 8, or rebuild with more (`medusa-export build --max-num-seqs 9`)"
    assert more_lanes_fix(8, 1000).endswith(f"--max-num-seqs {MAX_BUILD_LANES}`)")
    assert more_lanes_fix(MAX_BUILD_LANES, 100) == "use at most 64" and more_lanes_fix(1024, 2000) == "use at most 1024"
