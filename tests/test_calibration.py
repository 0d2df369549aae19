"""Calibration: head accuracy bookkeeping, latency measurement and the end-to-end `calibrate` on a tiny
random Llama with the PyTorch backend."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from medusa_export.runtime.calibration import (
    HeadAccuracy,
    calibrate,
    head_predictions,
    measure_head_accuracy,
    measure_latency,
    measure_steps,
)
from medusa_export.runtime.errors import InputError
from medusa_export.runtime.tree import Tree, load_choices

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NUM_HEADS = 3


@pytest.fixture(scope="module")
def backend():
    from medusa_export.exporter.heads import new_heads
    from medusa_export.exporter.torch_backend import TorchBackend

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    model = transformers.LlamaForCausalLM(cfg)
    heads = new_heads(cfg, num_heads=NUM_HEADS)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.05)
    # One thread: on a shared 2-core machine, intra-op threads contend and tiny steps get 100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TorchBackend(model, heads, max_seq=256, head_topk=5, sample_topk=8)
    torch.set_num_threads(threads)


PROMPTS = [[1, 17, 42, 99, 7], [5, 6, 7, 8, 9, 10, 11], [200, 3]]


def test_accuracy_from_hand_made_stream():
    ids = np.array([[1, 2], [3, 4], [5, 6]])  # [K=3, R=2]
    stream = [
        (ids, [1, 4, 6]),  # head0 r0, head1 r1, head2 r1
        (ids, [2, 9, 5]),  # head0 r1, head1 miss, head2 r0 (unreachable: not conditional)
        (ids, [9, 3]),  # head0 miss, head1 r0 (not conditional), no truth for head2
    ]
    acc = measure_head_accuracy(stream)
    np.testing.assert_allclose(acc.marginal, [[1 / 3, 1 / 3], [1 / 3, 1 / 3], [1 / 2, 1 / 2]])
    np.testing.assert_allclose(acc.conditional, [[1 / 3, 1 / 3], [0, 1 / 2], [0, 1]])
    assert acc.positions.tolist() == [3, 3, 2] and acc.conditional_positions.tolist() == [3, 2, 1]
    assert acc.table("marginal") is acc.marginal
    with pytest.raises(InputError):
        acc.table("nope")


def test_accuracy_falls_back_to_marginal_and_rejects_empty():
    ids = np.array([[1], [2]])
    acc = measure_head_accuracy([(ids, [9, 2]), (ids, [8, 2])])
    assert acc.conditional_positions.tolist() == [2, 0]
    np.testing.assert_allclose(acc.conditional, [[0], [1]])  # depth 1 never reachable: marginal
    with pytest.raises(InputError):
        measure_head_accuracy([])
    with pytest.raises(InputError):
        measure_head_accuracy([(ids, [1]), (np.zeros((3, 1)), [1])])


def test_head_predictions_align_with_greedy_tokens(backend):
    pairs = list(head_predictions(backend, [PROMPTS[0]], max_new_tokens=8))
    assert len(pairs) == 7  # 8 greedy tokens; the last has no future
    for ids, future in pairs:
        assert ids.shape == (NUM_HEADS, 5) and 1 <= len(future) <= NUM_HEADS
    # Future of position j is tokens j+1.., so consecutive futures overlap by one shift.
    for (_, f0), (_, f1) in zip(pairs, pairs[1:]):
        assert f0[1:].tolist() == f1[: len(f0) - 1].tolist()
    # Same greedy stream as a plain full forward of the model.
    full = list(PROMPTS[0])
    with torch.no_grad():
        for _ in range(8):
            full.append(_argmax_next(backend, full))
    greedy = full[len(PROMPTS[0]):]
    assert [int(f[0]) for _, f in pairs] == greedy[1:]


def _argmax_next(backend, ids):
    model_out = backend.base_step.lm_head(backend.base_step.backbone(input_ids=torch.tensor([ids])).last_hidden_state)
    return int(model_out[0, -1].argmax())


def test_head_predictions_stop_at_eos_and_capacity(backend):
    pairs = list(head_predictions(backend, [PROMPTS[0]], max_new_tokens=4))
    first = int(pairs[0][1][0])  # the 2nd greedy token
    short = list(head_predictions(backend, [PROMPTS[0]], max_new_tokens=4, eos_ids=[first]))
    assert len(short) == 1
    with pytest.raises(InputError):
        list(head_predictions(backend, [list(range(255))], max_new_tokens=4))


def test_measure_latency(backend):
    table = measure_latency(backend, sizes=[8, 1, 4, 4], past=300, repeats=2, warmup=1)
    assert list(table) == [1, 4, 8]  # past shrinks to fit max_seq=256
    assert all(v > 0 for v in table.values())
    with pytest.raises(InputError):
        measure_latency(backend, sizes=[300])


def test_measure_steps_times_the_graph_each_case_names(backend):
    seen = []

    class Recording:  # the backend, with every run's (T, medusa) recorded
        def __getattr__(self, name):
            return getattr(backend, name)

        def new_session(self, capacity=None):
            session = backend.new_session(capacity)
            run = session.run

            def recorded(ids, pos, mask, medusa, temperature):
                seen.append((len(ids), medusa))
                return run(ids, pos, mask, medusa, temperature)

            session.run = recorded
            return session

    table = measure_steps(Recording(), [(4, True), (1, False), (1, True)], past=20, repeats=3, warmup=1)
    assert set(table) == {(1, False), (1, True), (4, True)} and all(v > 0 for v in table.values())
    timed = seen[1:]  # after the prefill of the past
    assert len(timed) == 3 * 4 and {c: timed.count(c) for c in table} == {c: 4 for c in table}
    assert [m for _, m in timed] == [False] * 4 + [True] * 8  # one graph at a time, never interleaved
    with pytest.raises(InputError):
        measure_steps(backend, [])


def test_calibrate_end_to_end(backend, tmp_path):
    out = calibrate(backend, None, PROMPTS, max_new_tokens=10, node_budget=10,
                    sizes=[1, 2, 4, 8, 64], past=200, repeats=1, warmup=1)
    choices = out["medusa_choices"]
    cal = out["calibration"]
    tree = Tree.from_choices(choices, topk=backend.dims.head_topk, num_heads=NUM_HEADS)
    assert 1 <= len(choices) <= 10 and tree.max_depth <= NUM_HEADS
    acc = np.array(cal["head_accuracy"]["conditional"])
    assert acc.shape == (NUM_HEADS, 5) and acc.min() >= 0 and acc.max() <= 1
    assert np.array(cal["head_accuracy"]["marginal"]).shape == (NUM_HEADS, 5)
    nodes = cal["latency"]["nodes"]
    assert nodes == sorted(nodes) and nodes[0] == 1 and nodes[-1] == 11  # 64 dropped, budget + 1 added
    assert all(s > 0 for s in cal["latency"]["median_s"])
    assert [p["nodes"] for p in cal["curve"]] == list(range(1, 11))
    assert cal["tokens_per_s"] == max(p["tokens_per_s"] for p in cal["curve"])
    assert cal["candidates"] == len(choices) and cal["num_nodes"] == len(choices) + 1  # as the manifest counts
    assert cal["vanilla_tokens_per_s"] == pytest.approx(1 / cal["latency"]["vanilla_median_s"])
    assert cal["predicted_speedup"] == pytest.approx(cal["tokens_per_s"] / cal["vanilla_tokens_per_s"])
    # Round trip through tree.json.
    f = tmp_path / "tree.json"
    f.write_text(json.dumps(out))
    assert [list(p) for p in load_choices(str(f))] == choices


def test_calibrate_from_jsonl_with_tokenizer(backend, tmp_path):
    class Tok:
        eos_token_ids = ()

        def encode_prompt(self, text, chat=True):
            return [ord(c) % 256 for c in text]

    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "hello there"}\n\n{"prompt": "abc"}\n')
    out = calibrate(backend, Tok(), f, max_new_tokens=6, node_budget=4, sizes=[1, 2], repeats=1, warmup=0,
                    accuracy="marginal")
    assert out["calibration"]["prompts"] == 2 and out["calibration"]["accuracy_mode"] == "marginal"
    assert out["calibration"]["latency"]["nodes"] == [1, 2, 5]
    assert len(out["medusa_choices"]) <= 4


def test_calibrate_rejects_bad_options(backend):
    with pytest.raises(InputError):
        calibrate(backend, None, PROMPTS, accuracy="bogus")
    with pytest.raises(InputError):
        calibrate(backend, None, ["text"], max_new_tokens=4)  # text without a tokenizer
    with pytest.raises(InputError):
        calibrate(backend, None, PROMPTS, max_new_tokens=1)
    with pytest.raises(InputError):
        calibrate(backend, None, PROMPTS, node_budget=0)


def test_head_accuracy_dataclass_json():
    acc = HeadAccuracy(np.zeros((1, 2)), np.ones((1, 2)), np.array([3]), np.array([3]))
    assert json.loads(json.dumps(acc.to_json()))["marginal"] == [[1.0, 1.0]]


def test_calibrate_checks_budget_and_prompt_lengths_before_decoding(backend, monkeypatch, tmp_path):
    """A node budget beyond max_seq, or a prompt too long for it, was refused only after decoding the prompts before
    it, with a 0-based index and no file line."""
    from medusa_export.runtime import calibration

    def no_decoding(*_a, **_k):
        raise AssertionError("decoded before the check")

    monkeypatch.setattr(calibration, "head_predictions", no_decoding)
    with pytest.raises(InputError, match=r"--node-budget 255 does not fit the artifact's max_seq 256.*254 or less"):
        calibrate(backend, None, PROMPTS, node_budget=255)
    with pytest.raises(InputError, match=r"calibration prompt 2: the calibration prompt has 300 tokens.* 254 fit"):
        calibrate(backend, None, [[1, 2, 3], [7] * 300], node_budget=4)

    class Tok:
        eos_token_ids = ()

        def encode_prompt(self, text, chat=True):
            return [ord(c) % 256 for c in text]

    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "short"}\n\n{"prompt": "' + "x" * 300 + '"}\n')
    with pytest.raises(InputError, match=rf"{f} line 3: the calibration prompt has 300 tokens"):
        calibrate(backend, Tok(), f, node_budget=4)


@pytest.mark.parametrize("prompts, options, words", [
    ([[-1, 5]], {}, "calibration prompt 1: token ids must be integers in 0.."),  # wrapped to the last token
    ([[1.7, 5.2]], {}, "token ids must be integers"),  # was read as [1, 5]
    ([b"hello"], {}, "must be text or a list of token ids, got bytes"),  # was read as ids 104, 101, ...
    ([None], {}, "got NoneType"),
    (5, {}, "prompts must be a JSONL path or a list"),
    (PROMPTS, {"max_new_tokens": None}, "max_new_tokens must be an integer >= 2"),
    (PROMPTS, {"node_budget": 2.5}, "node budget must be an integer >= 1"),
    (PROMPTS, {"past": 0}, "past must be an integer >= 1"),
    (PROMPTS, {"repeats": 0}, "repeats must be an integer >= 1"),
    (PROMPTS, {"warmup": -1}, "warmup must be an integer >= 0"),
    (PROMPTS, {"sizes": ("x",)}, "a step size must be an integer >= 1"),
    (PROMPTS, {"sizes": ()}, "sizes must be a non-empty list"),
])
def test_calibrate_refuses_bad_inputs_by_name_before_any_work(backend, monkeypatch, prompts, options, words):
    """Library callers get a typed error naming the input, never a TypeError from deep inside or a calibration
    over the wrong tokens."""
    import medusa_export.runtime.calibration as calibration

    monkeypatch.setattr(calibration, "head_predictions", lambda *a, **k: pytest.fail("decoded before the checks"))
    with pytest.raises(InputError, match=re.escape(words)):
        calibrate(backend, None, prompts, **{"max_new_tokens": 4, "node_budget": 2, **options})


def test_calibrate_says_why_when_every_answer_ends_at_its_first_token(backend):
    """Every greedy answer ended at once (its first token an end of sequence): the error asked for "room for at
    least 2 new tokens", which the prompts had."""
    from types import SimpleNamespace

    eos_everywhere = SimpleNamespace(eos_token_ids=tuple(range(backend.dims.vocab_size)))
    assert list(head_predictions(backend, PROMPTS, max_new_tokens=8, eos_ids=eos_everywhere.eos_token_ids)) == []
    with pytest.raises(InputError, match="no answer ran past its first new token"):
        calibrate(backend, eos_everywhere, PROMPTS, max_new_tokens=8, node_budget=4, sizes=[1], repeats=1)


def test_calibration_closes_the_sessions_it_opens(backend):
    """Each prompt's decoding and the latency table opened a session (KV buffers) and never closed it."""
    opened = []

    class Counting:  # the backend, with every session it opens kept
        def __getattr__(self, name):
            return getattr(backend, name)

        def new_session(self, capacity=None):
            session = backend.new_session() if capacity is None else backend.new_session(capacity)
            closes = []
            real_close = session.close
            session.close = lambda: closes.append(1) or real_close()
            opened.append(closes)
            return session

    pairs = list(head_predictions(Counting(), PROMPTS[:2], max_new_tokens=3))
    measure_steps(Counting(), [(1, True), (2, False)], past=4, repeats=1, warmup=0)
    assert len(pairs) == 4 and len(opened) == 3 and all(opened), opened
