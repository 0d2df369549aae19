"""`medusa-export bench`'s report (`runtime/bench.py`) on the tiny artifact: its rows and their fields, the order in
which the modes run, the tree it records."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")

from conftest import ARTIFACT_TREE  # noqa: E402


def test_bench_report_shape(artifact, clock_free_steps):
    # Step costs pinned, rows free: under a parallel test worker, measured costs once made every draft of these
    # 6-token answers look too dear
    from medusa_export.runtime.bench import run_bench

    report = run_bench(artifact, ["ort"], ["t5 t6 t7", "t1 t2"], max_new_tokens=6)
    rows = report["results"]
    assert [(r["backend"], r["mode"]) for r in rows] == [("ort", "vanilla"), ("ort", "medusa"),
                                                          ("ort", "medusa+context")]
    assert all(r["identical_to_vanilla"] for r in rows)
    assert rows[0]["mean_accepted"] == 1.0 and rows[1]["tokens_per_s"] > 0
    assert rows[0]["accepted_heads"] == rows[0]["accepted_context"] == rows[1]["accepted_context"] == 0
    assert rows[1]["context_rows"] == 0 and rows[2]["context_rows"] > 0  # the tiny model's answers repeat
    for row in rows[1:]:
        assert row["speedup_vs_vanilla"] == pytest.approx(row["tokens_per_s"] / rows[0]["tokens_per_s"], rel=1e-2)
        assert row["mean_accepted"] == pytest.approx(1 + row["accepted_heads"] + row["accepted_context"], abs=1e-3)
    assert report["tree"]["medusa_choices"] == ARTIFACT_TREE  # the artifact's tree


@pytest.mark.parametrize("interleave", [True, False])
def test_bench_modes_take_turns_prompt_by_prompt_unless_sequential(artifact, monkeypatch, interleave):
    """Run one mode over every prompt, then the next, and a machine whose speed drifts over minutes biased the
    ratios (1.50x and 1.11x in two runs of one artifact); interleaved, each prompt runs in every mode, the modes in
    turn first."""
    from medusa_export.runtime.bench import run_bench
    from medusa_export.runtime.generator import Generator

    calls, real = [], Generator.generate

    def generate(self, prompt, cfg=None):
        calls.append((prompt, (cfg.medusa, cfg.context_drafts)))
        return real(self, prompt, cfg)

    monkeypatch.setattr(Generator, "generate", generate)
    prompts = ["t5 t6 t7", "t1 t2", "t3 t4"]
    report = run_bench(artifact, ["ort"], prompts, max_new_tokens=6, interleave=interleave)
    measured = calls[-9:]  # after the warm-up's short runs
    vanilla, heads, both = (False, True), (True, False), (True, True)  # (medusa, context_drafts)
    if interleave:
        assert measured == [(prompts[0], m) for m in (vanilla, heads, both)] + \
            [(prompts[1], m) for m in (heads, both, vanilla)] + [(prompts[2], m) for m in (both, vanilla, heads)]
    else:
        assert measured == [(p, m) for m in (vanilla, heads, both) for p in prompts]
    rows = report["results"]
    assert [r["mode"] for r in rows] == ["vanilla", "medusa", "medusa+context"] and report["interleaved"] is interleave
    assert all(r["identical_to_vanilla"] for r in rows) and all(r["new_tokens"] == rows[0]["new_tokens"] for r in rows)


def test_bench_reports_the_tree_it_ran_with(artifact):
    from medusa_export.runtime.bench import run_bench

    report = run_bench(artifact, ["ort"], ["t5 t6"], max_new_tokens=4, tree="chain-2")
    assert report["tree"] == {"name": "chain-2", "medusa_choices": [[0], [0, 0]], "num_nodes": 3}
