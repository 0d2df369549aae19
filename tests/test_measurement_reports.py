"""What `verify`, `bench` and `calibrate-tree` report is what they measured: verify's Medusa checks run the heads'
graph on every prompt, nothing compared is None (not a match), no speed-up from zero tokens, and the JSON
written is strict (no NaN or Infinity)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_cli import cli
from test_cli_inputs import refused_before_work

pytest.importorskip("onnxruntime")


def strict(text: str):
    """``text`` parsed as strict JSON: NaN, Infinity and -Infinity are refused."""
    def refuse(word: str):
        raise ValueError(f"not strict JSON: {word}")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------------------------------- verify


def test_verify_runs_the_heads_graph_on_every_medusa_prompt(artifact, monkeypatch):
    """Left to `Speculation.heads_for`, every other greedy request (all of them where the heads do not pay) ran
    the vanilla graph: verify counted those as "medusa identical" (2 of 4 prompts on a tampered artifact)."""
    from medusa_export.runtime import MedusaRuntime
    from medusa_export.runtime.compare import compare_backends
    from medusa_export.runtime.decode import GenerationConfig
    from medusa_export.runtime.errors import InputError
    from medusa_export.runtime.generator import Generator
    from medusa_export.runtime.speculation import Speculation

    monkeypatch.setattr(Speculation, "heads_for", lambda self, tree: None)  # the heads "never pay" here
    cfg_of = lambda n: GenerationConfig(max_new_tokens=n)  # noqa: E731
    graphs, real = [], Generator.generate

    def generate(self, prompt, cfg=None, **options):
        result = real(self, prompt, cfg, **options)
        if cfg is not None and cfg.medusa:
            graphs.append(result.medusa)
        return result

    monkeypatch.setattr(Generator, "generate", generate)
    with MedusaRuntime.load(artifact) as a, MedusaRuntime.load(artifact) as b:
        report = compare_backends({"ort": a.generator, "again": b.generator}, ["t5 t6 t7", "t1 t2", "t3"],
                                  max_new_tokens=6)
        assert graphs == [True] * 6, graphs
        assert a.generator.generate("t5 t6 t7", cfg_of(6)).medusa is False  # other requests: the library's choice
        with pytest.raises(InputError, match="heads must be True or None"):
            a.generator.generate("t5", cfg_of(2), heads=1)
    assert report["summary"]["again"]["medusa_identical"] == 3 and report["summary"]["again"]["ok"]


class _Forced:
    """A teacher-forced forward's outputs: top-1 ids and probabilities per position."""

    def __init__(self, ids: list[int]) -> None:
        self.next_ids = np.asarray(ids)[:, None]
        self.next_probs = np.full((len(ids), 1), 0.5, np.float32)


def test_verify_reports_what_it_did_not_compare_as_none(artifact, monkeypatch):
    """No heads: the Medusa mode never ran, and "medusa identical 1/1" claimed a match of nothing. No position
    whose top-1 agreed: the error was inf, written as the bare word Infinity that strict JSON readers refuse."""
    from medusa_export.runtime import MedusaRuntime, compare
    from medusa_export.runtime.report_json import report_text

    calls = iter([1, 4])  # every position's top-1: the two backends never agree
    monkeypatch.setattr(compare, "teacher_forced", lambda gen, ids: _Forced([next(calls)] * len(ids)))
    with MedusaRuntime.load(artifact) as a, MedusaRuntime.load(artifact) as b:
        a.generator.tree = b.generator.tree = None
        report = compare.compare_backends({"ort": a.generator, "again": b.generator}, ["t5 t6 t7"], max_new_tokens=3)
    s = report["summary"]["again"]
    assert s["medusa_identical"] is None and s["max_prob_error"] is None and s["top1_agreement"] == 0.0
    assert s["ok"] is False and report["rows"][0]["again_max_prob_error"] is None
    assert strict(report_text(report))["summary"]["again"]["max_prob_error"] is None


def test_reports_are_strict_json():
    from medusa_export.runtime.report_json import report_text

    text = report_text({"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": (np.float64("nan"),)})
    assert strict(text) == {"a": None, "b": [None, None, 1.5], "c": [None]} and text.endswith("\n")


# ------------------------------------------------------------------------------------------- bench


def test_no_speedup_from_zero_tokens():
    from medusa_export.runtime.bench import speedup, summarize

    assert speedup(0.0, 10.0) is None and speedup(10.0, 0.0) is None and speedup(None, 1.0) is None
    assert speedup(15.0, 10.0) == 1.5
    assert summarize("ort", "vanilla", [], 0.0, True)["tokens_per_s"] is None


def test_bench_speedup_is_of_tokens_per_second(artifact):
    """A row whose answers differ from vanilla's made other tokens: its speed-up is a ratio of rates, not of
    times."""
    from medusa_export.runtime.bench import run_bench

    rows = run_bench(artifact, ["ort"], ["t5 t6 t7"], max_new_tokens=4)["results"]
    for row in rows[1:]:
        assert row["speedup_vs_vanilla"] == pytest.approx(row["tokens_per_s"] / rows[0]["tokens_per_s"], abs=2e-3)


@pytest.mark.parametrize("tree, words", [("[]", "has no paths"), ('{"medusa_choices": []}', "has no paths"),
                                         ("", "--tree is empty"), ("  ", "--tree is empty")])
def test_bench_refuses_a_tree_without_paths_before_the_work(artifact, tmp_path, tree, words):
    """An empty tree ran the "medusa" rows without any heads' tree and reported their speed-up; an empty value
    was read as ".", a directory the user never named."""
    if tree.strip():
        (tmp_path / "t.json").write_text(tree)
        tree = str(tmp_path / "t.json")
    proc = cli("bench", str(artifact), "--no-hf", "--max-new-tokens", "2", "--tree", tree)
    refused_before_work(proc, words)


# ------------------------------------------------------------------------------------------- calibrate-tree


def test_calibrate_tree_shows_unscored_heads_as_unknown(capsys):
    """A head no answer ran long enough to test has no hit rate: "-" and a warning, not 0.000."""
    from medusa_export.runtime.cli.train_cmd import _print_accuracy

    _print_accuracy({"marginal": [[0.5, 0.25], [0.0, 0.0]], "positions": [4, 0]}, max_new_tokens=2)
    out, err = capsys.readouterr()
    assert out.splitlines() == ["head  top-1  top-5", "   0  0.500  0.750", "   1      -      -"]
    assert "head 1 scored no position" in err and "--max-new-tokens (now 2)" in err


def test_a_tree_without_paths_is_refused_wherever_a_user_gives_one(artifact, tmp_path):
    """`MedusaRuntime.load(tree=...)` (and so serve / generate --tree) and build took a tree of the root alone:
    "Medusa" then ran without a single guess of the heads."""
    from medusa_export.runtime import MedusaRuntime
    from medusa_export.runtime.build_options import BuildOptions
    from medusa_export.runtime.errors import TreeError
    from medusa_export.runtime.tree import given_choices

    empty = tmp_path / "empty.json"
    empty.write_text('{"medusa_choices": []}')
    for call in (lambda: MedusaRuntime.load(artifact, tree=str(empty)), lambda: BuildOptions(tree=str(empty)),
                 lambda: given_choices([])):
        with pytest.raises(TreeError, match="has no paths: give at least one"):
            call()
    assert given_choices("chain-1") == ((0,),)
    proc = cli("generate", str(artifact), "--prompt", "t5", "--max-new-tokens", "2", "--tree", str(empty))
    refused_before_work(proc, "has no paths")
