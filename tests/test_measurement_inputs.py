"""Inputs at the edges of what `bench`, `verify` (`compare`, `quality`, `lanes_check`) and the reports they write
take: no prompts, one new token, answers of no token, answers that run to the KV capacity, checks that compare
nothing, numpy values in a JSON report, and the machine the figures were measured on."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from medusa_export.runtime.errors import InputError

# ------------------------------------------------------------------------------------------- bench


def _result(token_ids: list[int], step_ms: list[float], step_tokens: int, prefill_ms: float = 2.0):
    from medusa_export.runtime.generator import GenerationResult

    return GenerationResult(text="", token_ids=token_ids, new_tokens=len(token_ids), steps=len(step_ms),
                            mean_accepted=0.0, tokens_per_s=0.0, finish_reason="stop", backend="ort", medusa=False,
                            prefill_ms=prefill_ms, step_ms=step_ms, step_tokens=step_tokens)


def test_a_row_of_answers_without_tokens_or_steps_reports_no_rate_or_percentile():
    """Every answer ended at once (an end of sequence as the first token): no step to take a percentile of, no
    accepted length, 0 tokens/s and so no speed-up."""
    from medusa_export.runtime.bench import speedup, summarize

    row = summarize("ort", "medusa", [_result([], [], 0), _result([], [], 0, prefill_ms=4.0)], 0.5, True)
    assert row["tokens_per_s"] == 0.0 and row["new_tokens"] == 0 and row["prefill_ms"] == 3.0
    assert row["mean_accepted"] is row["step_ms_p50"] is row["step_ms_p90"] is row["accepted_heads"] is None
    assert speedup(row["tokens_per_s"], 10.0) is None
    mixed = summarize("ort", "vanilla", [_result([7], [], 0), _result([1, 2, 3], [1.0, 3.0], 2)], 2.0, True)
    assert mixed["tokens_per_s"] == 2.0 and mixed["mean_accepted"] == 1.0 and mixed["step_ms_p50"] == 2.0


@pytest.mark.parametrize("prompts", [[], ()])
def test_bench_refuses_no_prompts_before_any_work(artifact, prompts):
    """No prompt: the warm-up failed with an IndexError (prompts[0]) after the artifact loaded."""
    pytest.importorskip("onnxruntime")
    from medusa_export.runtime.bench import check_room, run_bench

    with pytest.raises(InputError, match="no prompts to run: give a prompts file with at least one"):
        run_bench(artifact, ["ort"], list(prompts), max_new_tokens=2)
    with pytest.raises(InputError, match="no prompts"):
        check_room(artifact, list(prompts), 2)  # verify's check, before its models load


def test_bench_of_one_new_token_warms_up_within_it_and_records_threads(artifact, monkeypatch):
    """max_new_tokens 1: every answer is the prefill's token, no step. The warm-up asked for 8 tokens whatever the
    room `check_room` had found for the prompts."""
    pytest.importorskip("onnxruntime")
    from medusa_export.runtime.bench import run_bench
    from medusa_export.runtime.generator import Generator

    asked, real = [], Generator.generate

    def generate(self, prompt, cfg=None, **options):
        asked.append(cfg.max_new_tokens)
        return real(self, prompt, cfg, **options)

    monkeypatch.setattr(Generator, "generate", generate)
    report = run_bench(artifact, ["ort"], ["t5 t6 t7"], max_new_tokens=1, threads=1)
    assert asked and set(asked) == {1}, asked
    assert report["threads"] == 1 and report["prompts"] == 1
    for row in report["results"]:
        assert row["new_tokens"] == 1 and row["mean_accepted"] is None and row["step_ms_p50"] is None
        assert row["identical_to_vanilla"] is True and row["tokens_per_s"] > 0


# ------------------------------------------------------------------------------------------- verify: compare


class _Gen(SimpleNamespace):
    """A generator as `compare_backends` sees it: a tree (or None), a tokenizer, a backend's max_seq."""


def _gen(max_seq: int = 64, tree: object = "tree") -> _Gen:
    return _Gen(tree=tree, backend=SimpleNamespace(max_seq=max_seq),
                tokenizer=SimpleNamespace(encode_prompt=lambda prompt, chat=True: [1, 2, 3]))


class _Forced:
    def __init__(self, n: int) -> None:
        self.next_ids = np.zeros((n, 1), np.int64)
        self.next_probs = np.full((n, 1), 0.5, np.float32)


def _answers(monkeypatch, answers: dict) -> list[list[int]]:
    """``compare``'s generations from ``answers[(generator, medusa)]``; the ids each teacher-forced forward got."""
    from medusa_export.runtime import compare

    forced: list[list[int]] = []
    monkeypatch.setattr(compare, "generate_on_graph", lambda g, prompt, cfg: answers[(id(g), cfg.medusa)])
    monkeypatch.setattr(compare, "teacher_forced", lambda g, ids: forced.append(list(ids)) or _Forced(len(ids)))
    return forced


def test_verify_checks_medusa_against_vanilla_and_forces_the_vanilla_answer(monkeypatch):
    """Both backends' Medusa answers agreed with each other (a fault of the shared decoding) but not with vanilla:
    verify said OK. The teacher-forced forward took the reference's Medusa answer, the last mode's."""
    from medusa_export.runtime.compare import compare_backends

    ref, other = _gen(), _gen()
    forced = _answers(monkeypatch, {(id(ref), False): [4, 5, 6], (id(ref), True): [4, 5, 9],
                                    (id(other), False): [4, 5, 6], (id(other), True): [4, 5, 9]})
    report = compare_backends({"torch": ref, "ort": other}, ["p"], max_new_tokens=3)
    s = report["summary"]
    assert s["ort"]["vanilla_identical"] == s["ort"]["medusa_identical"] == 1
    assert s["ort"]["medusa_equals_vanilla"] == 0 and s["reference_medusa_equals_vanilla"] == 0
    assert s["ort"]["ok"] is False
    assert forced == [[1, 2, 3, 4, 5, 6]] * 2  # the vanilla answer, through both backends


def test_verify_passes_when_every_answer_agrees_and_skips_medusa_without_heads(monkeypatch):
    from medusa_export.runtime.compare import compare_backends

    ref, other = _gen(), _gen()
    _answers(monkeypatch, {(id(g), m): [4, 5] for g in (ref, other) for m in (False, True)})
    s = compare_backends({"torch": ref, "ort": other}, ["p", "q"], max_new_tokens=2)["summary"]
    assert s["ort"]["medusa_equals_vanilla"] == 2 and s["reference_medusa_equals_vanilla"] == 2 and s["ort"]["ok"]
    ref.tree = other.tree = None
    s = compare_backends({"torch": ref, "ort": other}, ["p"], max_new_tokens=2)["summary"]
    assert s["ort"]["medusa_equals_vanilla"] is None and "reference_medusa_equals_vanilla" not in s and s["ort"]["ok"]


@pytest.mark.parametrize("differ, want", [(slice(0, 8), 1.0), (slice(8, 9), 7 / 8)])
def test_verify_top1_agreement_counts_every_answer_position_alike(monkeypatch, differ, want):
    """As `quality` counts it: each position that chose an answer token, whatever its prompt. The mean of per-prompt
    agreements weighed a 1-token answer as much as a 7-token one, and the prompt's positions counted too (a long
    prompt outweighed its answer). Here the long prompt's positions differ where ``differ`` says."""
    from medusa_export.runtime import compare

    ref, other = _gen(), _gen()
    ref.tokenizer = SimpleNamespace(encode_prompt=lambda prompt, chat=True: [1] * (1 if prompt == "short" else 9))
    monkeypatch.setattr(compare, "generate_on_graph", lambda g, prompt, cfg: [4] * (7 if prompt == "short" else 1))

    def forced(g, ids):
        out = _Forced(len(ids))
        if g is other and len(ids) == 10:  # the long prompt: 9 prompt tokens, 1 answer token (chosen at row 8)
            out.next_ids[differ] += 1
        return out

    monkeypatch.setattr(compare, "teacher_forced", forced)
    s = compare.compare_backends({"torch": ref, "ort": other}, ["short", "long"], max_new_tokens=7)["summary"]
    assert s["ort"]["top1_agreement"] == pytest.approx(want)


@pytest.mark.parametrize("prompts, names, words", [([], ("torch", "ort"), "no prompts to compare"),
                                                    (["p"], ("torch",), "needs at least two")])
def test_verify_refuses_to_compare_nothing(monkeypatch, prompts, names, words):
    """No prompts: max() of no errors raised a ValueError. One backend: nothing compared, and no backend failed."""
    from medusa_export.runtime.compare import compare_backends

    gens = {n: _gen() for n in names}
    _answers(monkeypatch, {(id(g), m): [4] for g in gens.values() for m in (False, True)})
    with pytest.raises(InputError, match=words):
        compare_backends(gens, prompts, max_new_tokens=2)


# ------------------------------------------------------------------------------------------- verify: quality


def test_quality_of_an_answer_that_runs_to_the_kv_capacity(artifact):
    """The answer that fills the KV buffer has one token more than fits: quality's teacher-forced forward was
    refused ("exceeds the maximum sequence"), so build and verify of a quantized artifact failed on a long prompt."""
    pytest.importorskip("onnxruntime")
    from medusa_export.runtime import MedusaRuntime
    from medusa_export.runtime.decode import GenerationConfig
    from medusa_export.runtime.quality import quality

    prompt = " ".join(f"t{i % 50}" for i in range(120))
    with MedusaRuntime.load(artifact) as a, MedusaRuntime.load(artifact) as b:
        prompt_tokens = len(a.generator.tokenizer.encode_prompt(prompt))
        answer = a.generator.generate(prompt, GenerationConfig(max_new_tokens=64, medusa=False))
        assert answer.finish_reason == "length" and prompt_tokens + answer.new_tokens > a.generator.backend.max_seq
        q = quality(a.generator, b.generator, [prompt], max_new_tokens=64)
        assert q.positions == a.generator.backend.max_seq - prompt_tokens  # every answer token that has a position
        assert q.top1_agreement == 1.0 and q.perplexity_change == 0.0 and q.passes
        with pytest.raises(InputError, match="no quality prompts"):
            quality(a.generator, b.generator, [], max_new_tokens=4)


# ------------------------------------------------------------------------------------------- verify: lanes


def test_the_lanes_check_refuses_to_check_nothing(artifact):
    """No prompt read "identical -> OK" (exact True over zero rows)."""
    pytest.importorskip("onnxruntime")
    from medusa_export.runtime import MedusaRuntime
    from medusa_export.runtime.lanes_check import lanes_exactness

    with MedusaRuntime.load(artifact) as rt:
        backend = rt.generator.backend
        for prompts in ([], [[5, 6], []]):
            with pytest.raises(InputError, match="needs at least one prompt"):
                lanes_exactness(backend, prompts)
        assert lanes_exactness(backend, [[5, 6, 7]])["exact"] is True


def test_the_lanes_check_compares_top_ids_too(artifact, monkeypatch):
    """The docstring promised top ids and probabilities; only the probabilities were compared."""
    pytest.importorskip("onnxruntime")
    from medusa_export.runtime import MedusaRuntime, lanes_check

    real = lanes_check._alone

    def alone(backend, prompt, steps):
        outputs = real(backend, prompt, steps)
        ids, probs = outputs[-1]
        outputs[-1] = (ids[:, ::-1].copy(), probs)  # the same probabilities, other ids
        return outputs

    monkeypatch.setattr(lanes_check, "_alone", alone)
    with MedusaRuntime.load(artifact) as rt:
        report = lanes_check.lanes_exactness(rt.generator.backend, [[5, 6, 7], [1, 2]])
    assert report["exact"] is False and report["max_abs_difference"] == 0.0


def test_a_nan_difference_is_not_reported_as_none():
    """Python's max(0.0, nan) is 0.0: a lanes step of NaN probabilities read "max difference 0.0e+00"."""
    from medusa_export.runtime.lanes_check import _largest
    from medusa_export.runtime.report_json import report_text

    nan = np.array([[np.nan, 0.5]], np.float32)
    ok = np.array([[0.25, 0.5]], np.float32)
    assert np.isnan(_largest(0.0, nan, ok)) and np.isnan(_largest(_largest(0.0, nan, ok), ok, ok))
    assert _largest(0.1, ok, ok) == 0.1 and _largest(0.0, ok, ok[:, :1]) == float("inf")
    assert json.loads(report_text({"max_abs_difference": _largest(0.0, nan, ok)})) == {"max_abs_difference": None}


# ------------------------------------------------------------------------------------------- reports and machine


def test_numpy_values_in_a_report_are_written_as_strict_json():
    """A float32 or int64 in a report made json.dumps raise TypeError after the measurement; a float32 NaN too."""
    from medusa_export.runtime.report_json import report_text

    report = {"a": np.float32("nan"), "b": np.int64(7), "c": np.array([1.5, np.inf]), np.int64(3): np.bool_(True),
              "d": [np.float32(0.25)]}
    assert json.loads(report_text(report)) == {"a": None, "b": 7, "c": [1.5, None], "3": True, "d": [0.25]}


def test_machine_records_the_cpus_this_process_may_use_and_sse2(monkeypatch):
    """A benchmark in a 2-CPU container on a 64-core host recorded "cores": 64; without "sse2" in the flags read,
    an x86 CPU without AVX2 was taken for one whose int8 products never clip (`kernels.clipping_int8_products`)."""
    from medusa_export.runtime import kernels, machine

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3}, raising=False)
    cpuinfo = "processor\t: 0\nmodel name\t: Old x86\nflags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx\n"
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text",
                        lambda self, *a, **k: cpuinfo if str(self) == "/proc/cpuinfo" else real(self, *a, **k))
    monkeypatch.setattr(Path, "exists", lambda self: True if str(self) == "/proc/cpuinfo" else os.path.exists(self))
    info = machine.machine_info()
    assert info["cores"] == 2 and info["cpu_count"] == os.cpu_count() and info["flags"] == ["sse2", "avx"]
    assert kernels.clipping_int8_products() is True


def test_a_container_over_its_memory_limit_has_nothing_free(monkeypatch):
    tables = {"/sys/fs/cgroup/memory.max": "1000\n", "/sys/fs/cgroup/memory.current": "1500\n"}

    def read_text(self, *args, **kwargs):
        if str(self) not in tables:
            raise FileNotFoundError(str(self))
        return tables[str(self)]

    from medusa_export.runtime import machine

    monkeypatch.setattr(Path, "read_text", read_text)
    assert machine.available_ram() == 0
