"""The `medusa-export` command line: exit codes, one-line errors, JSON output, light start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

GENERATE_KEYS = {"text", "token_ids", "new_tokens", "steps", "mean_accepted", "tokens_per_s", "finish_reason",
                 "backend", "medusa"}


def cli(*args: str, timeout: int = 600, cwd=None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``env``: variables set on top of this process's environment."""
    code = "import sys; from medusa_export.runtime.cli.app import main; sys.argv[0] = 'medusa-export'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **env} if env else None)


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_help_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from medusa_export.runtime.cli.app import main\n"
        "sys.argv = ['medusa-export', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'onnx', 'tensorrt') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    for command in ("build", "generate", "bench", "verify", "train-heads", "calibrate-tree"):
        assert command in proc.stdout


def test_generate_errors_are_one_line(tmp_path):
    assert_one_line_error(cli("generate", str(tmp_path / "nope"), "--prompt", "hi"), "not found")
    bad = tmp_path / "m"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert_one_line_error(cli("generate", str(bad), "--prompt", "hi"), "gpt2", "llama")
    assert_one_line_error(cli("generate", str(tmp_path / "nope"), "--prompt", "hi", "--backend", "ort"),
                          "run `medusa-export build")


def test_generate_json_on_artifact(artifact):
    proc = cli("generate", str(artifact), "--prompt", "t5 t6 t7", "--no-chat", "--max-new-tokens", "9", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert GENERATE_KEYS <= set(out)
    assert out["backend"] == "ort" and out["medusa"] is True and 1 <= out["new_tokens"] <= 9
    van = json.loads(cli("generate", str(artifact), "--prompt", "t5 t6 t7", "--no-chat", "--max-new-tokens", "9",
                         "--json", "--no-medusa").stdout)
    assert van["token_ids"] == out["token_ids"] and van["medusa"] is False


def test_generate_summary_counts_in_the_singular_and_plural(artifact):
    import re

    for n in (1, 5):
        proc = cli("generate", str(artifact), "--prompt", "t5 t6 t7", "--no-chat", "--max-new-tokens", str(n))
        assert proc.returncode == 0, proc.stderr
        summary = re.search(r"\] (\d+) (tokens?) in (\d+) (steps?),", proc.stderr)
        assert summary, proc.stderr
        tokens, token_word, steps, step_word = summary.groups()
        assert token_word == ("token" if tokens == "1" else "tokens") and step_word == ("step" if steps == "1" else "steps")
        assert int(tokens) == n or "finish: stop" in proc.stderr


def test_generate_into_a_closed_pipe_ends_quietly_as_sigpipe_would(artifact):
    """`generate ... | head -c 1`: once the reader has gone, exit 141 (what the shell reports for a program SIGPIPE
    stopped) with nothing on stderr; it was a silent 1, the code of a failure."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte: the first write fails, deterministically
    code = "import sys; from medusa_export.runtime.cli.app import main; sys.argv[0] = 'medusa-export'; main()"
    try:
        proc = subprocess.run([sys.executable, "-c", code, "generate", str(artifact), "--prompt", "t5 t6 t7",
                               "--no-chat", "--max-new-tokens", "9"], stdout=write, stderr=subprocess.PIPE, text=True,
                              timeout=600)
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", (proc.returncode, proc.stderr)


def test_generate_with_its_standard_output_closed_says_so(artifact):
    """Started with stdout closed (`>&-`), Python has no sys.stdout and every write was dropped: the answer went
    nowhere and the exit code was 0."""
    code = "import sys; from medusa_export.runtime.cli.app import main; sys.argv[0] = 'medusa-export'; main()"
    proc = subprocess.run(["bash", "-c", 'exec "$@" >&-', "bash", sys.executable, "-c", code, "generate", str(artifact),
                           "--prompt", "t5 t6 t7", "--no-chat", "--max-new-tokens", "3"], capture_output=False,
                          stderr=subprocess.PIPE, text=True, timeout=600)
    assert proc.returncode == 2 and proc.stderr.startswith("error: standard output is closed"), proc.stderr


def test_a_path_with_control_characters_stays_on_one_error_line(tmp_path):
    """A newline in a path (or any control character: a terminal escape) is escaped in the error, so an argument
    cannot forge lines of its own on stderr."""
    bad = str(tmp_path / "nope\nerror: FAKE LINE\x1b[31m")
    for command in ("bench", "verify"):
        proc = cli(command, bad, "--no-hf") if command == "bench" else cli(command, bad)
        assert_one_line_error(proc, "nope\\nerror: FAKE LINE\\x1b[31m")


def test_generate_bad_tree_and_backend(artifact):
    assert_one_line_error(cli("generate", str(artifact), "--prompt", "t1", "--tree", "chain-7"), "3 heads")
    assert_one_line_error(cli("generate", str(artifact), "--prompt", "t1", "--tree", "nosuchtree"), "unknown tree")
    assert_one_line_error(cli("generate", str(artifact), "--prompt", "t1", "--backend", "tpu"), "unknown backend")


def test_build_rejects_bad_options(tmp_path, tiny_dirs):
    out = tmp_path / "a"
    assert_one_line_error(cli("build", str(tiny_dirs[0]), "--out", str(out), "--dtype", "int3"), "fp32")
    assert not out.exists()


def test_verify_and_bench_commands(artifact, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "t5 t6 t7"}\n{"prompt": "t9 t8"}\n')
    proc = cli("verify", str(artifact), "--prompts", str(prompts), "--max-new-tokens", "8",
               "--json", str(tmp_path / "v.json"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ort vs torch" in proc.stdout and "OK" in proc.stdout
    verified = json.loads((tmp_path / "v.json").read_text())
    assert verified["summary"]["ort"]["ok"] is True
    assert "ort batched steps (lanes graph) vs one-sequence steps: 2 prompts together, identical -> OK" in proc.stdout
    assert verified["lanes"]["ort"]["exact"] is True and verified["lanes"]["ort"]["sequences"] == 2
    pytest.importorskip("matplotlib")
    proc = cli("bench", str(artifact), "--prompts", str(prompts), "--max-new-tokens", "6", "--backends", "ort,torch",
               "--concurrency", "2", "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    assert set(report) >= {"model", "prompts", "max_new_tokens", "results"}
    modes = {(r["backend"], r["mode"]) for r in report["results"]}
    assert modes >= {("ort", "vanilla"), ("ort", "medusa"), ("ort", "medusa+context"), ("torch", "medusa+context"),
                     ("transformers", "vanilla"), ("ort", "vanilla x2"), ("ort", "medusa+context x2")}
    batched = [r for r in report["results"] if r["mode"].endswith(" x2")]
    assert all(r["concurrency"] == 2 and r["steps"] > 0 and r["new_tokens"] > 0 for r in batched)
    assert all(r["identical_to_vanilla"] for r in report["results"])
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_commands_need_nothing_outside_the_package_and_the_artifact(artifact, tmp_path):
    """From an empty working directory, with no prompts given, bench, verify and calibrate-tree run on the packaged
    prompt set, and write nothing but the files they were asked to write."""
    from medusa_export.runtime.prompts import read_prompts

    here = tmp_path / "empty"
    here.mkdir()
    n = len(read_prompts(None, limit=2))
    out = tmp_path / "b.json"
    proc = cli("bench", str(artifact), "--limit", "2", "--max-new-tokens", "3", "--no-hf", "--json", str(out), cwd=here)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["prompts"] == n
    proc = cli("verify", str(artifact), "--limit", "2", "--max-new-tokens", "3", cwd=here)
    assert proc.returncode == 0 and "ort vs torch" in proc.stdout, proc.stderr
    proc = cli("calibrate-tree", str(artifact), "--limit", "2", "--max-new-tokens", "4", "--node-budget", "3",
               "--out", str(tmp_path / "tree.json"), cwd=here)
    assert proc.returncode == 0 and (tmp_path / "tree.json").exists(), proc.stderr
    assert list(here.iterdir()) == []


def test_bad_prompts_file_names_the_line(artifact, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{oops\n')
    assert_one_line_error(cli("bench", str(artifact), "--prompts", str(bad)), "line 2")


def test_calibrate_tree_writes_a_tree_that_build_and_generate_accept(artifact, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "t5 t6 t7"}\n{"prompt": "t9 t8 t3"}\n')
    out = tmp_path / "sub" / "tree.json"
    proc = cli("calibrate-tree", str(artifact), "--data", str(prompts), "--out", str(out),
               "--max-new-tokens", "8", "--node-budget", "6")
    assert proc.returncode == 0, proc.stderr
    cal = json.loads(out.read_text())["calibration"]
    assert 1 <= cal["num_nodes"] <= 6 and cal["prompts"] == 2
    assert f"{cal['vanilla_tokens_per_s']:.1f} vanilla" in proc.stdout  # baseline: the vanilla graph's step
    assert "timing steps of" in proc.stderr and "timing steps of" not in proc.stdout  # progress: a closed stdout
    # (`| head -c 1`) ended the calibration at its first line and lost the tree
    assert abs(cal["predicted_speedup"] - cal["tokens_per_s"] / cal["vanilla_tokens_per_s"]) < 1e-9
    assert ("do not pay" in proc.stderr) == (cal["predicted_speedup"] <= 1.0)
    proc = cli("generate", str(artifact), "--prompt", "t5 t6", "--tree", str(out), "--max-new-tokens", "6", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["medusa"] is True


def test_calibrate_tree_rejects_a_bad_prompts_file(artifact, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{oops\n')
    out = tmp_path / "tree.json"
    assert_one_line_error(cli("calibrate-tree", str(artifact), "--data", str(bad), "--out", str(out)), "line 2")
    assert not out.exists()


def test_calibrate_tree_says_model_goes_with_the_torch_backend_before_checking_the_output(artifact, tmp_path):
    """--model beside --backend ort was reported as the output path overwriting a file of --model's directory."""
    out = tmp_path / "cal" / "tree.json"
    assert_one_line_error(cli("calibrate-tree", str(artifact), "--model", str(tmp_path), "--out", str(out)),
                          "--model is the base model of --backend torch", "leave --model out")
    assert not out.parent.exists()


def test_train_heads_options_reach_the_trainer(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from typer.testing import CliRunner

    from medusa_export.exporter.training import train as train_mod
    from medusa_export.runtime.training_options import Medusa1Options
    from medusa_export.runtime.cli.app import _register, app

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    out = tmp_path / "heads"
    seen = []
    monkeypatch.setattr(train_mod, "train_heads", lambda model, data, o, options: seen.append(options) or {})
    _register()
    result = CliRunner().invoke(app, ["train-heads", "--data", str(prompts), "--out", str(out),
                                      "--extra-sampled-passes", "1", "--sample-temperature", "0.5", "--amp", "bf16"])
    assert result.exit_code == 0, result.output
    assert seen == [Medusa1Options(extra_sampled_passes=1, sample_temperature=0.5, amp="bf16")]
    proc = cli("train-heads", "--data", str(prompts), "--out", str(out), "--extra-sampled-passes", "1",
               "--sample-temperature", "0.5", "--amp", "bogus")
    assert_one_line_error(proc, "--amp", "bogus")  # refused with the options, before any model is loaded
    assert not out.exists()


def test_train_heads_command_writes_heads_that_load(tiny_dirs, tmp_path):
    model_dir, _ = tiny_dirs
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "t{i} t{i + 1} t{i + 2}"}}\n' for i in range(3, 40, 4)))
    out = tmp_path / "heads"
    proc = cli("train-heads", str(model_dir), "--data", str(prompts), "--out", str(out), "--num-heads", "2",
               "--epochs", "1", "--max-new-tokens", "8", "--gen-batch-size", "4", "--heldout-fraction", "0.2",
               "--extra-sampled-passes", "1", "--cache-dir", str(tmp_path / "cache"), "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert f"heads written to {out}" in proc.stdout
    record = json.loads((out / "training.json").read_text())
    assert record["args"]["extra_sampled_passes"] == 1 and len(record["distillation"]) == 2
    assert (record["args"]["num_heads"], record["args"]["epochs"], record["args"]["threads"]) == (2, 1, 1)
    assert str(record["training_positions"]) in proc.stdout
    assert {"config.json", "eval.json", "heldout_prompts.jsonl"} <= {p.name for p in out.iterdir()}


def test_build_command_makes_an_artifact_generate_runs(tiny_dirs, tmp_path):
    model_dir, heads_dir = tiny_dirs
    out = tmp_path / "art"
    proc = cli("build", str(model_dir), "--heads", str(heads_dir), "--tree", "chain-2", "--max-seq", "64",
               "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tree"]["medusa_choices"] == [[0], [0, 0]] and manifest["max_seq"] == 64
    proc = cli("generate", str(out), "--prompt", "t5 t6", "--max-new-tokens", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["medusa"] is True and result["new_tokens"] == 5


def test_a_portable_build_prints_no_onnx_runtime_notes(tiny_dirs, tmp_path):
    """Folding constants opened ONNX Runtime sessions at its default log level: 28 lines of optimizer notes
    ("UnsqueezeElimination cannot remove node ...") on a successful build of the tiny model."""
    model_dir, heads_dir = tiny_dirs
    proc = cli("build", str(model_dir), "--heads", str(heads_dir), "--tree", "chain-2", "--max-seq", "64",
               "--graph", "portable", "--max-num-seqs", "1", "--out", str(tmp_path / "art"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and "[W]" not in proc.stdout, proc.stderr[:500]
