"""Inputs a user gives by mistake to `calibrate-tree`, `bench`, `verify` and their libraries: a prompts file whose
lines past `--limit` are broken, a node budget past the largest tree, a `--tree` that does not fit the graph (or names
a file like a chain preset), a report path over the packaged prompts or spelled as a directory, a bench whose answers
took no decoding step (whose "speed-up" would be a ratio of prefill times) or that Ctrl-C stopped, and a comparison of
a backend with itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_cli import cli
from test_cli_inputs import refused_before_work

from medusa_export.runtime.errors import InputError

# ------------------------------------------------------------------------------------------- calibrate-tree


def test_prompt_names_read_no_further_than_the_prompt_named(tmp_path):
    """`calibrate-tree --limit 1` named where its prompt sits by reading (and parsing) the whole file: a broken line
    past the limit was the error, not the prompt that was read."""
    from medusa_export.runtime.calibration import prompt_names

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "t1"}\n\n{"prompt": "t2"}\n{broken\n')
    name = prompt_names(path)
    assert name(0) == f"{path} line 1" and name(1) == f"{path} line 3"


def test_calibrate_tree_limit_reads_only_its_prompts(artifact, tmp_path):
    """The first prompt is too long for the artifact: that is the error, not the broken line after the limit."""
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": " ".join(["t5"] * 300)}) + "\n{broken\n")
    out = tmp_path / "sub" / "tree.json"
    refused_before_work(cli("calibrate-tree", str(artifact), "--data", str(data), "--limit", "1", "--out", str(out),
                            "--node-budget", "2"), f"{data} line 1: the calibration prompt has")
    assert not (tmp_path / "sub").exists()


def test_a_node_budget_past_the_largest_tree_is_refused_before_any_work():
    """A budget past `MAX_TREE_NODES` passed on a long artifact; after the decoding and timing, a chosen tree that
    large failed in `Tree` as "the tree given has N paths" (and could never be loaded from the file written)."""
    from medusa_export.runtime.calibration import check_node_budget
    from medusa_export.runtime.tree import MAX_TREE_NODES
    from medusa_export.runtime.tree_search import search_tree

    check_node_budget(MAX_TREE_NODES, 1 << 20)
    with pytest.raises(InputError, match=f"--node-budget {MAX_TREE_NODES + 1} is past the largest tree"):
        check_node_budget(MAX_TREE_NODES + 1, 1 << 20)
    acc = np.full((4, 10), 0.99)  # heads always right, steps free: the largest tree wins
    assert search_tree(acc, lambda t: 1.0, node_budget=MAX_TREE_NODES).candidates == MAX_TREE_NODES
    with pytest.raises(InputError, match="node budget 2000 is past the largest tree"):
        search_tree(acc, lambda t: 1.0, node_budget=2000)


# ------------------------------------------------------------------------------------------- bench --tree


@pytest.mark.parametrize("tree, words", [
    ("[[0], [0]]", "appears twice"),
    ("[[0, 0]]", "has no parent"),
    ("[[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]", "only 3 Medusa heads"),
    ("[[0], [99]]", "rank 99"),
    ("[[0], [1], [2], [3], [4]]", "verifies at most 4"),  # 5 root-to-leaf paths, the fused graph verifies 4
])
def test_bench_refuses_a_tree_that_does_not_fit_the_graph_before_the_work(artifact, tmp_path, tree, words):
    """Found only when a backend loaded: after the progress bar started (two lines), and with `--backends torch,ort`
    after every torch row."""
    path = tmp_path / "tree.json"
    path.write_text(tree)
    refused_before_work(cli("bench", str(artifact), "--no-hf", "--limit", "1", "--max-new-tokens", "2", "--tree",
                            str(path), "--json", str(tmp_path / "b.json")), words)
    assert not (tmp_path / "b.json").exists()


# ------------------------------------------------------------------------------------------- bench ratios


def test_bench_reports_no_speedup_when_no_answer_took_a_step(artifact):
    """With one new token every answer is the prefill's: Medusa never ran a step, and the "speed-up" was a ratio
    of prefill times."""
    pytest.importorskip("onnxruntime")
    from medusa_export.runtime.bench import run_bench

    rows = run_bench(artifact, ["ort"], ["t5 t6 t7"], max_new_tokens=1, threads=1)["results"]
    assert [r["mode"] for r in rows] == ["vanilla", "medusa", "medusa+context"]
    assert all(r["tokens_per_s"] > 0 and r["mean_accepted"] is None for r in rows)
    assert all(r["speedup_vs_vanilla"] is None for r in rows[1:])


# ------------------------------------------------------------------------------------------- report paths


def test_reports_never_overwrite_the_packaged_prompts_they_read(tmp_path):
    """Without --prompts / --data the commands read the packaged prompt set: a report written there replaced it
    (every later run without --prompts then failed on a JSON report read as prompts). The artifact does not exist:
    before the fix the command stopped there, so this test never wrote over the package."""
    from medusa_export.runtime.prompts import PACKAGED_PROMPTS

    before = PACKAGED_PROMPTS.read_bytes()
    missing = str(tmp_path / "no-artifact")
    packaged = str(PACKAGED_PROMPTS)
    for args, flag in ((("bench", missing, "--no-hf", "--json", packaged), "--json"),
                       (("verify", missing, "--backends", "ort,trt", "--json", packaged), "--json"),
                       (("calibrate-tree", missing, "--out", packaged), "--out")):
        refused_before_work(cli(*args), flag, "would overwrite", packaged)
    assert PACKAGED_PROMPTS.read_bytes() == before


def test_a_tree_file_named_like_a_chain_preset_is_read_as_the_file(tmp_path, monkeypatch):
    """`--tree chain-big.json` in the current directory was "bad chain preset 'chain-big.json'"; presets keep their
    names (a file called chain-4 does not shadow the preset)."""
    from medusa_export.runtime.errors import TreeError
    from medusa_export.runtime.tree import chain, load_choices

    monkeypatch.chdir(tmp_path)
    (tmp_path / "chain-big.json").write_text("[[0], [1]]")
    (tmp_path / "chain-4").write_text("[[1]]")
    assert load_choices("chain-big.json") == ((0,), (1,))
    assert load_choices("chain-4") == chain(4)
    with pytest.raises(TreeError, match="tree file 'chain-x.json' does not exist"):
        load_choices("chain-x.json")


def test_a_tree_for_an_artifact_without_heads_is_refused_not_ignored():
    """Such an artifact verifies no heads' tree: the tree given to bench, generate, serve or the library was ignored
    without a word."""
    from manifest_samples import sample_manifest

    from medusa_export.runtime.api import artifact_tree
    from medusa_export.runtime.cli.bench_cmd import _check_tree_fits
    from medusa_export.runtime.errors import TreeError

    with pytest.raises(TreeError, match="tree 'chain-2': the artifact has no Medusa heads"):
        artifact_tree(sample_manifest(num_heads=0), "chain-2")
    with pytest.raises(TreeError, match="the artifact has no Medusa heads"):
        _check_tree_fits(sample_manifest(num_heads=0), "chain-2", ["ort"])
    assert artifact_tree(sample_manifest(num_heads=0), None) is None
    _check_tree_fits(sample_manifest(num_heads=2), "chain-2", ["ort"])  # fits


def test_a_bench_stopped_by_ctrl_c_says_so_once(artifact):
    """The saved report's reason read "KeyboardInterrupt: KeyboardInterrupt" (the name, then the empty message's
    stand-in, the name again)."""
    pytest.importorskip("onnxruntime")
    from medusa_export.runtime.bench import run_bench

    saved = []

    def measured(report: dict) -> None:
        saved.append(report)
        if len(saved) == 1:  # Ctrl-C right after the first row
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bench(artifact, ["ort"], ["t5 t6 t7"], max_new_tokens=2, measured=measured, interleave=False)
    assert saved[-1]["incomplete"] == "stopped after 1 rows: KeyboardInterrupt"
    assert [r["mode"] for r in saved[-1]["results"]] == ["vanilla"]


@pytest.mark.parametrize("command", ["bench", "verify", "calibrate-tree"])
def test_a_report_path_spelled_as_a_directory_is_refused(artifact, tmp_path, command):
    """`--json reports/` (a trailing slash: a directory, which does not exist yet) wrote a file named "reports"."""
    flag = "--out" if command == "calibrate-tree" else "--json"
    extra = ("--backends", "ort,torch") if command == "verify" else ("--no-hf",) if command == "bench" else ()
    target = str(tmp_path / "reports") + "/"
    refused_before_work(cli(command, str(artifact), *extra, "--limit", "1", "--max-new-tokens", "2", flag, target),
                        flag, "ends in a slash")
    assert not (tmp_path / "reports").exists()
    if command == "bench":
        refused_before_work(cli(command, str(artifact), *extra, "--plot", str(tmp_path / "plot.png") + "/"),
                            "--plot", "ends in a slash")


# ------------------------------------------------------------------------------------------- verify


def test_comparing_a_backend_with_itself_is_refused():
    """`compare_backends` given one generator (or one backend) under two names compared it with itself: every
    answer identical, agreement 1.0, error 0, "ok" whatever the backend computes."""
    from types import SimpleNamespace

    from medusa_export.runtime.compare import compare_backends

    backend = SimpleNamespace(max_seq=64)
    gen = SimpleNamespace(tree=None, backend=backend)  # no generate(): nothing may run before the refusal
    with pytest.raises(InputError, match="'b' is the same backend as 'a'"):
        compare_backends({"a": gen, "b": gen}, ["t1"])
    with pytest.raises(InputError, match="'b' is the same backend as 'a'"):
        compare_backends({"a": gen, "b": SimpleNamespace(tree=None, backend=backend)}, ["t1"])
