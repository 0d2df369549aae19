"""Batched steps on the TensorRT backend (`runtime/backends/trt_lanes.py`), against the stand-ins of
`tests/fake_trt.py` (ONNX Runtime runs the portable graph at the shapes and addresses the backend binds).

The vanilla engine built with ``max_num_seqs`` > 1 gets a batch profile; the engine then decodes running
sequences together in it, padded to one [B, T] block, each lane's KV prefix copied into the batch past and its
new rows copied back into its own session."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
pytest.importorskip("transformers")

from medusa_export.runtime.backends import trt_availability as availability  # noqa: E402
from test_trt_backend import _cfg, _copy, fakes, tiny  # noqa: E402,F401 - fixtures shared with that module

SKIP_REASON = availability.skip_reason()

# Prompts of 2 to 30 tokens: the longer ones exceed the batch profile's 8 rows and go in causal chunks.
PROMPTS = [[5, 17, 42, 99, 7, 8, 9], [200, 3], list(range(3, 33)), [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]


def _engines(art, **options):
    from medusa_export.engines.cli_entry import build_engines_for_artifact

    return build_engines_for_artifact(art, required=True, log=lambda s: None, **options)


@pytest.fixture
def batched(fakes, tiny, tmp_path):
    art = _copy(tiny, tmp_path / "art")
    manifest = _engines(art, max_num_seqs=3, batch_tokens=8)
    return art, manifest


def test_the_vanilla_engine_gets_a_batch_profile(batched):
    _, manifest = batched
    vanilla, medusa = manifest.engines["vanilla"], manifest.engines["medusa"]
    assert [p.name for p in vanilla.profiles] == ["prefill", "decode", "batch"]
    batch = vanilla.profiles[2]
    assert batch.batch == (1, 3, 3) and batch.seq == (1, 1, 8) and batch.past[2] == 47  # max_seq 48
    assert all(p.batch == (1, 1, 1) for p in vanilla.profiles[:2] + medusa.profiles)


def test_batched_answers_equal_the_answers_alone(batched, fakes, monkeypatch):
    """Four greedy requests through three lanes (arrivals staggered by the engine's admission), prompts longer
    than the profile's rows among them, the batch past growing from 4 rows: each answer equals its answer alone,
    on TensorRT and on ONNX Runtime."""
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.backends import trt_lanes

    monkeypatch.setattr(trt_lanes, "MIN_PAST_ROWS", 4)
    art, _ = batched
    ort_gen = MedusaRuntime.load(art, backend="ort").generator
    rt = MedusaRuntime.load(art, backend="trt")
    assert rt.generator.backend.lanes.lanes == 3
    for medusa in (False, True):
        alone = [rt.generator.generate(p, _cfg(medusa, 12)).token_ids for p in PROMPTS]
        assert alone == [ort_gen.generate(p, _cfg(medusa, 12)).token_ids for p in PROMPTS]
        fakes.record["shapes"] = []
        together = rt.generate_many(PROMPTS, max_new_tokens=12, medusa=medusa, chat=False)
        assert [r.token_ids for r in together] == alone, medusa
        batches = [b for b, _, _ in fakes.record["shapes"]]
        assert max(batches) == 3  # three lanes in one execution
        assert max(t for b, t, _ in fakes.record["shapes"] if b > 1) == 8  # long prompts went in chunks
    rt.close()


def test_lanes_with_different_temperatures_run_as_separate_executions(batched, fakes):
    """The graph takes one temperature: a sampled request beside greedy ones is its own execution, and the greedy
    answers do not change."""
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.backends.lanes import Lane

    art, _ = batched
    rt = MedusaRuntime.load(art, backend="trt")
    backend = rt.generator.backend
    sessions = [backend.new_session() for _ in range(3)]
    feeds = [np.asarray(p, np.int64) for p in ([5, 6, 7], [8, 9], [10, 11, 12, 13])]
    fakes.record["shapes"] = []
    outs = backend.lanes.run([Lane(s, f, t) for s, f, t in zip(sessions, feeds, (1.0, 0.7, 1.0))])
    assert sorted(b for b, _, _ in fakes.record["shapes"]) == [1, 2]
    for s, f, t, out in zip(sessions, feeds, (1.0, 0.7, 1.0), outs):
        with backend.new_session() as alone:
            ref = alone.run(f, np.arange(len(f)), np.tri(len(f), dtype=bool), False, t)
        np.testing.assert_array_equal(out.next_ids, ref.next_ids)
        np.testing.assert_allclose(out.next_probs, ref.next_probs, atol=1e-6)
        backend.lanes.keep(s, np.arange(len(f)))
        assert s.length == len(f)
        s.close()
    rt.close()


def test_a_lane_past_its_capacity_is_refused_before_any_work(batched, fakes):
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.backends.lanes import Lane

    art, _ = batched
    rt = MedusaRuntime.load(art, backend="trt")
    backend = rt.generator.backend
    with backend.new_session(capacity=4) as small, backend.new_session() as other:
        executions = fakes.record.get("executions", 0)
        with pytest.raises(ValueError, match="do not fit a KV buffer of 4"):
            backend.lanes.run([Lane(other, np.arange(3, 6), 1.0), Lane(small, np.arange(3, 8), 1.0)])
        assert fakes.record.get("executions", 0) == executions
    rt.close()


def test_engines_without_a_batch_profile_take_turns(fakes, tiny, tmp_path):
    """Engines built before batch profiles existed (manifest profiles without ``batch``) or with --max-num-seqs 1
    load without lanes; requests then run one after the other, with the same answers."""
    from medusa_export.runtime.api import MedusaRuntime

    art = _copy(tiny, tmp_path / "art")
    _engines(art, max_num_seqs=1)
    path = art / "manifest.json"
    data = json.loads(path.read_text())
    for record in data["engines"].values():
        for profile in record["profiles"]:
            del profile["batch"]
    path.write_text(json.dumps(data))
    rt = MedusaRuntime.load(art, backend="trt")
    assert rt.generator.backend.lanes is None
    alone = [rt.generator.generate(p, _cfg(False, 8)).token_ids for p in PROMPTS[:2]]
    assert [r.token_ids for r in rt.generate_many(PROMPTS[:2], max_new_tokens=8, medusa=False, chat=False)] == alone
    rt.close()


def test_bench_refuses_more_concurrency_than_the_batch_profile_takes(batched):
    from medusa_export.runtime.cli.bench_cmd import _check_artifact
    from medusa_export.runtime.errors import InputError

    art, _ = batched
    _check_artifact(art, ["trt"], 3)
    with pytest.raises(InputError, match="--concurrency 4 exceeds the artifact's TensorRT batch profile \\(3 sequences\\)"):
        _check_artifact(art, ["trt"], 4)


def test_the_batch_past_grows_with_the_longest_prefix_and_frees_the_old_one(batched, fakes, monkeypatch):
    """The batch past starts small and doubles (or jumps to what a step needs) instead of holding every lane's
    whole capacity twice; the replaced buffer is freed; Engine.kv_bytes counts the sessions' KV."""
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.backends import trt_lanes
    from medusa_export.runtime.backends.lanes import Lane
    from medusa_export.runtime.engine import Engine

    monkeypatch.setattr(trt_lanes, "MIN_PAST_ROWS", 4)
    art, _ = batched
    rt = MedusaRuntime.load(art, backend="trt")
    lanes = rt.generator.backend.lanes
    grown = []
    # 4 rows to start; 7 needs 8 (doubled); 20 goes in chunks of 8 rows (16 after 2 chunks), then its step needs 20: 32
    for prefix in (2, 3, 7, 20):
        sessions = [rt.generator.backend.new_session() for _ in range(2)]
        for s in sessions:
            lanes.run([Lane(s, np.arange(3, 3 + prefix), 1.0)])
            lanes.keep(s, np.arange(prefix))
        before = set(fakes.cuda.live)
        lanes.run([Lane(s, np.array([5]), 1.0) for s in sessions])
        for s in sessions:
            lanes.keep(s, np.arange(1))
        grown.append(lanes.device.past_rows)
        assert lanes.kv_bytes >= 2 * prefix * lanes.row * lanes.layers
        if prefix == 20:  # the step itself regrew the buffer: the old one is freed, a new one made
            assert set(fakes.cuda.live) - before and before - set(fakes.cuda.live)
        for s in sessions:
            s.close()
    assert grown == [4, 4, 8, 32]
    engine = Engine(rt.generator)
    assert engine.kv_bytes == 3 * engine.slots[0].layers * engine.slots[0].pitch > 0
    engine.close()
    rt.close()


def test_a_closed_session_is_refused(batched):
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.backends.lanes import Lane

    art, _ = batched
    rt = MedusaRuntime.load(art, backend="trt")
    session = rt.generator.backend.new_session()
    session.close()
    with pytest.raises(ValueError, match="lane 0: its session is closed"):
        rt.generator.backend.lanes.run([Lane(session, np.array([5, 6]), 1.0)])
    rt.close()


def test_the_batch_profile_takes_no_more_rows_than_the_prefill_profile(batched):
    """A context's activation memory follows its largest profile: B x T of the batch profile stays within the
    prefill profile's T, so adding it costs the session contexts nothing."""
    from medusa_export.engines.profiles import engine_profiles

    _, manifest = batched
    for seqs in (2, 3, 8, 24, 64):
        prefill, _, batch = engine_profiles(manifest, "vanilla", max_num_seqs=seqs)
        assert batch.batch == (1, seqs, seqs) and batch.seq[2] == max(1, min(64, prefill.seq[2] // seqs))
        assert batch.batch[2] * batch.seq[2] <= max(prefill.seq[2], seqs)


@pytest.mark.gpu
@pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
def test_real_tensorrt_batched_answers_equal_the_answers_alone(tiny, tmp_path):
    """On a GPU with TensorRT: the batch profile is built and batched greedy answers equal the answers alone (not
    guaranteed bit for bit on TensorRT, see docs/tensorrt.md; on a tiny fp32 model the tokens should agree)."""
    from medusa_export.runtime.api import MedusaRuntime

    art = _copy(tiny, tmp_path / "art")
    _engines(art, max_num_seqs=3, batch_tokens=8)
    with MedusaRuntime.load(art, backend="trt") as rt:
        assert rt.generator.backend.lanes is not None
        alone = [rt.generator.generate(p, _cfg(False, 12)).token_ids for p in PROMPTS]
        together = rt.generate_many(PROMPTS, max_new_tokens=12, medusa=False, chat=False)
        assert [r.token_ids for r in together] == alone


def test_a_request_alone_feeds_its_prompt_in_prefill_profile_chunks(batched, fakes):
    """With a batch profile the engine chunks a lone request's prompt so that newcomers can join; on TensorRT a
    chunk is as large as the prefill profile takes (24 here), not --max-num-batched-tokens (8): a 30-token prompt
    goes in two executions of the one-sequence engine, not four."""
    from medusa_export.runtime.api import MedusaRuntime

    art, _ = batched
    with MedusaRuntime.load(art, backend="trt") as rt:
        assert rt.generator.backend.alone_prefill_chunk == 24
        fakes.record["shapes"] = []
        rt.generate_many([list(range(3, 33))], max_num_batched_tokens=8, max_new_tokens=1, medusa=False, chat=False)
        assert [t for b, t, _ in fakes.record["shapes"]][:2] == [24, 6]
