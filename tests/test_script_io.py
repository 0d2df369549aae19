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


# ------------------------------------------------------------------------------------------- every script's edges

# the scripts that run on an artifact, each with the least it needs besides the artifact (no work runs: it is missing)
ON_AN_ARTIFACT = {
    "ab_chunk": ["--old-source", str(SCRIPTS / "script_io.py")], "ab_step": ["{a}"], "artifact_quality": ["{a}"],
    "bench_streaming": [], "compare_answers": ["{a}", "--prompts", "{p}"], "confidence_planning_sim": ["--prompts", "{p}"],
    "corpus_ngram_replay": ["--answers", "{p}"], "draft_union_sim": ["--prompts", "{p}"],
    "engine_split": ["--prompts", "{p}"], "exactness_cost": [], "head_accuracy": ["--prompts", "{p}"],
    "kv_pages": [], "lanes_profile": [], "ort_overhead": [], "int8_variants": ["{a}"],
}


def _prompts(tmp_path) -> Path:
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    return tmp_path / "p.jsonl"


def _one_line(done: subprocess.CompletedProcess, starts: str = "error:") -> None:
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith(starts), done.stderr


@pytest.mark.parametrize("script", sorted(ON_AN_ARTIFACT))
def test_a_missing_artifact_is_one_line_for_every_script(script, tmp_path):
    """These printed a traceback and exited 1 (kv_pages: its child process's)."""
    none, p = str(tmp_path / "none"), str(_prompts(tmp_path))
    _one_line(_run(script, none, *[a.format(a=none, p=p) for a in ON_AN_ARTIFACT[script]]))


def test_a_missing_kernel_source_is_one_line(tmp_path):
    done = _run("ab_chunk", str(tmp_path), "--old-source", str(tmp_path / "none.c"))
    _one_line(done)
    assert "--old-source" in done.stderr


@pytest.mark.parametrize("script,args", [
    ("confidence_planning_sim", ["a", "--prompts", "p.jsonl", "--range", "5"]),
    ("confidence_planning_sim", ["a", "--prompts", "p.jsonl", "--range", "9:3"]),
    ("artifact_quality", ["a", "b", "--first", "-1"]),
    ("artifact_quality", ["a", "b", "--count", "0"]),
    ("draft_union_sim", ["a", "--prompts", "p.jsonl", "--first", "x"]),
    ("screen_candidates", ["--prompts", "p.jsonl", "--count", "0"]),
    ("int8_torch_sim", ["--prompts", "p.jsonl", "--first", "-3"]),
    ("engine_split", ["a", "--prompts", "p.jsonl", "--limit", "0"]),
    ("compare_answers", ["a", "b", "--prompts", "p.jsonl", "--limit", "-1"]),
    ("heads_choice_ab", ["a", "--prompts", "p.jsonl", "--json", "/nonexistent-folder/r.json"]),
    ("exactness_cost", ["a", "--json", "/nonexistent-folder/r.json"]),
    ("kv_pages", ["a", "--json", "/nonexistent-folder/r.json"]),
    ("step_latency", ["a", "--json", "/"]),
    ("artifact_quality", ["a", "b", "--json-lines", "/nonexistent-folder/r.jsonl"]),
])
def test_bad_ranges_and_unwritable_reports_are_refused_before_any_work(script, args):
    """--range 5 was a ValueError traceback after the artifact loaded, --first -1 took the last prompt, --limit -1
    dropped one, and an unwritable --json failed only once the measurement was done."""
    _one_line(_run(script, *args), f"{script}.py: error:")


def test_writable_span_and_prompt_rows(io, tmp_path):
    import argparse

    from medusa_export.runtime.errors import InputError

    assert io.writable(str(tmp_path / "r.json")) == tmp_path / "r.json"
    for bad in (str(tmp_path), str(tmp_path / "no" / "r.json")):
        with pytest.raises(argparse.ArgumentTypeError):
            io.writable(bad)
    assert io.span("200:280") == (200, 280)
    for bad in ("5", "a:b", "3:3", "-1:4", "1:2:3"):
        with pytest.raises(argparse.ArgumentTypeError):
            io.span(bad)
    p = tmp_path / "p.jsonl"
    p.write_text("".join(f'{{"prompt": "q{i}"}}\n' for i in range(3)))
    assert io.prompt_rows(p, 1, 5) == ["q1", "q2"]
    with pytest.raises(InputError, match="no prompt from row 3"):
        io.prompt_rows(p, 3, 1)


def test_run_main_passes_on_an_exit_status_and_paths_are_written_as_text(io, tmp_path):
    with pytest.raises(SystemExit) as done:
        io.run_main(lambda: 1)
    assert done.value.code == 1
    io.run_main(lambda: None)
    io.write_json(tmp_path / "r.json", {"json": tmp_path / "r.json"})
    assert json.loads((tmp_path / "r.json").read_text()) == {"json": str(tmp_path / "r.json")}


def test_with_machine_records_the_cpu_flags(io):
    report = io.with_machine({"rows": []})
    assert report["rows"] == [] and isinstance(report["machine"]["flags"], list) and report["machine"]["cpu"]
    assert io.with_machine({"machine": "kept"}) == {"machine": "kept"}


def test_every_report_a_script_writes_is_whole_and_records_the_machine():
    """Reports were written with open(..., "w") or write_text (a half-written file where a run was stopped), and
    those of 13 scripts (heads_choice_ab, plan_replay, step_latency, bench_streaming, compare_answers, head_accuracy,
    corpus_ngram_replay, distill_speed, learning_curve, peer_memory, torch_cuda_check, artifact_quality, and
    confidence_planning_sim's fine) left out the CPU and its flags, which every result records."""
    import re

    unrecorded, torn = [], []
    for path in sorted(SCRIPTS.glob("*.py")):
        if path.stem == "script_io":
            continue
        text = path.read_text()
        if re.search(r'[^d]open\([^)]*, "w"\)|\.write_text\(json\.dumps\((?!manifest)', text):  # int8_variants:
            torn.append(path.name)  # a manifest copied into its work folder is no report
        writes_report = re.search(r"write_json\((?:args|a)\.(?:json|out)\b", text) or "--json-lines" in text
        if writes_report and "with_machine(" not in text and not re.search(r'"machine"\]? ?[:=] machine_info\(\)', text):
            unrecorded.append(path.name)
    assert not torn and not unrecorded, (torn, unrecorded)


def test_what_ort_overhead_prints_records_the_machine(artifact):
    """scripts/report_default.sh keeps ort_overhead's printed JSON as the result; the machine was added only after
    printing, so that result carried no CPU flags."""
    pytest.importorskip("onnxruntime")
    done = _run("ort_overhead", str(artifact), "--tokens", "2", "--repeats", "1", "--threads", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert isinstance(json.loads(done.stdout.strip().splitlines()[-1])["machine"]["flags"], list)
