"""scripts/script_io.py and the benchmark scripts' edges: arguments checked before anything runs (one line, exit 2),
a missing peer named with the package to install, reports written whole as strict JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SCRIPTS, load_script


@pytest.fixture(scope="module")
def io():
    return load_script("script_io")


def test_positive_and_non_negative_reject_what_they_should(io):
    import argparse

    assert io.positive("3") == 3 and io.non_negative("0") == 0
    for bad in ("0", "-2", "x", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            io.positive(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        io.non_negative("-1")


def test_write_json_is_strict_and_whole(io, tmp_path):
    out = tmp_path / "r.json"
    io.write_json(out, {"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}})
    assert json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(c)) == \
        {"a": None, "b": [None, 1.5], "c": {"d": None}}
    with pytest.raises(TypeError):  # not serialisable: the file written before stays as it was, no temporary left
        io.write_json(out, {"x": object()})
    assert json.loads(out.read_text())["b"] == [None, 1.5]
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_summary_of_empty_answers_has_no_division_by_zero(io):
    compare = load_script("compare_peers")
    runners = load_script("peer_runners")
    runs = [runners.Run(submitted=1.0, done=1.0) for _ in range(2)]
    row = compare.summarize("x", 1, runs, [[], []])
    assert row["tokens_per_s"] == 0 and row["identical_to_reference"] == "2/2"
    json.dumps(row, allow_nan=False)
    assert set(compare.PEER_PACKAGES) == {"openvino-genai", "onnxruntime-genai", "ctranslate2", "llama.cpp"}


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / f"{script}.py"), *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("script,args", [
    ("compare_peers", ["--prompts", "p.jsonl", "--ours", "a", "--limit", "0"]),
    ("compare_peers", ["--prompts", "p.jsonl", "--ours", "a", "--concurrency", "-1"]),
    ("mixed_load", ["a", "--streams", "0"]),
    ("outside_products", ["a", "--blocks", "0"]),
    ("heads_choice_ab", ["a", "--prompts", "p.jsonl", "--count", "0"]),
    ("plan_replay", ["a", "--prompts", "p.jsonl", "--first", "-1"]),
    ("load_test", ["a", "--concurrency", "0"]),
])
def test_bad_numbers_are_one_line_and_exit_2(script, args):
    done = _run(script, *args)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"{script}.py: error:")


def test_a_missing_prompts_file_is_one_line(tmp_path):
    done = _run("plan_replay", str(tmp_path), "--prompts", str(tmp_path / "none.jsonl"), "--count", "1",
                "--costs-ms", ",".join(["1"] * 9))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error:")


def test_a_missing_artifact_is_one_line(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    done = _run("compare_peers", "--prompts", str(tmp_path / "p.jsonl"), "--ours", str(tmp_path / "none"))
    assert done.returncode == 2 and "does not exist" in done.stderr and "Traceback" not in done.stderr
