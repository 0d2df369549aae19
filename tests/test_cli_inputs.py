"""Bad command-line input is refused in one line before any long work: a damaged model, train-heads' --out and
--cache-dir, backend lists, limits, --max-seq, --threads and --concurrency beyond the
artifact's lanes (output paths: test_cli_output_paths.py; the machine and the cache variable: test_cli_environment.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_cli import assert_one_line_error, cli

from medusa_export.runtime.errors import InputError


def refused_before_work(proc: subprocess.CompletedProcess, *words: str) -> None:
    """One error line and nothing else: no progress, no table, no model loaded (stdout stays empty)."""
    assert_one_line_error(proc, *words)
    assert proc.stdout == "", proc.stdout


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / "config.json").write_text("{bad"), "cannot be read as JSON"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), "must hold a JSON object"),
    (lambda d: (d / "config.json").write_bytes(b"\xff\xfe"), "cannot be read as JSON"),
    (lambda d: ((d / "config.json").unlink(), (d / "config.json").mkdir()), "cannot be read as JSON"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100]),
     "cannot load model from"),
])
def test_a_damaged_model_directory_is_a_one_line_error(tiny_dirs, tmp_path, damage, words):
    model = shutil.copytree(tiny_dirs[0], tmp_path / "model")
    damage(model)
    result = cli("build", str(model), "--heads", str(tiny_dirs[1]), "--max-seq", "64", "--out", str(tmp_path / "a"))
    assert_one_line_error(result, words)
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------------------------------- train-heads --out


@pytest.fixture
def train_args(tiny_dirs, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "t1 t2"}\n')
    return ("train-heads", str(tiny_dirs[0]), "--data", str(prompts), "--max-new-tokens", "2", "--epochs", "1")


def test_train_heads_refuses_an_out_it_did_not_write(tiny_dirs, tmp_path, train_args):
    model = tmp_path / "model"
    shutil.copytree(tiny_dirs[0], model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    refused_before_work(cli(*train_args, "--out", str(model)), "--out", "not a heads directory")
    refused_before_work(cli(*train_args, "--out", str(model), "--mode", "medusa2"), "not a Medusa-2 model directory")
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before  # the base model's config.json is intact
    afile = tmp_path / "afile"
    afile.write_text("x")
    refused_before_work(cli(*train_args, "--out", str(afile)), "--out", "is an existing file")
    refused_before_work(cli(*train_args, "--out", str(afile / "heads")), "--out", "is a file")
    refused_before_work(cli(*train_args, "--out", str(tmp_path / "h"), "--cache-dir", str(afile)),
                        "--cache-dir", "is an existing file")
    assert not (tmp_path / "h").exists()


def test_train_heads_refuses_an_empty_data_or_model(tiny_dirs, tmp_path):
    """An empty --data read the current directory (as a directory of prompts); an empty MODEL is no model."""
    out = str(tmp_path / "h")
    refused_before_work(cli("train-heads", str(tiny_dirs[0]), "--data", "", "--out", out), "--data is empty")
    refused_before_work(cli("train-heads", "", "--data", "sharegpt", "--out", out), "the MODEL argument is empty")
    assert not (tmp_path / "h").exists()


def test_train_heads_out_may_be_its_own_earlier_output(tiny_dirs, tmp_path):
    """A heads directory (rerun: replaced), an interrupted run's checkpoint (rerun: resumed), a Medusa-2 model
    directory for --mode medusa2; never the same with another program's files instead."""
    from medusa_export.exporter.train_out_dir import check_train_out_dir

    check_train_out_dir(tiny_dirs[1], "medusa1")  # save_heads' output, as train-heads writes it
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    (interrupted / "checkpoint.pt").write_bytes(b"state")
    check_train_out_dir(interrupted, "medusa1")
    (interrupted / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a heads directory"):
        check_train_out_dir(interrupted, "medusa1")
    medusa2 = tmp_path / "m2"
    medusa2.mkdir()
    (medusa2 / "config.json").write_text(json.dumps({"model_type": "llama", "medusa_num_heads": 2}))
    (medusa2 / "training.json").write_text(json.dumps({"mode": "medusa2"}))
    check_train_out_dir(medusa2, "medusa2")
    with pytest.raises(InputError, match="not a heads directory"):
        check_train_out_dir(medusa2, "medusa1")
    with pytest.raises(InputError, match="not a Medusa-2 model directory"):
        check_train_out_dir(tiny_dirs[1], "medusa2")


def test_train_out_check_knows_what_train_heads_writes():
    """output_dir names these without importing torch; they must stay the trainer's."""
    from medusa_export.exporter import heads
    from medusa_export.exporter.train_out_dir import CHECKPOINT_FILES, HEADS_FORMAT
    from medusa_export.exporter.training import checkpoint

    assert HEADS_FORMAT == heads.HEADS_FORMAT
    assert CHECKPOINT_FILES == {checkpoint.FILE, Path(checkpoint.FILE).with_suffix(".tmp").name}


# ------------------------------------------------------------------------------------------- backends and limits


def test_backend_lists_with_duplicates_or_empty_names_are_refused(artifact):
    a = str(artifact)
    refused_before_work(cli("verify", a, "--backends", "ort,ort", "--limit", "1"), "ort twice")
    refused_before_work(cli("verify", a, "--backends", "ort", "--limit", "1"), "at least 2")
    refused_before_work(cli("bench", a, "--backends", ",", "--limit", "1", "--no-hf"), "--backends")
    refused_before_work(cli("bench", a, "--backends", "ort,ort", "--limit", "1", "--no-hf"), "ort twice")


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_limit_below_one_is_refused(artifact, tmp_path, limit):
    a = str(artifact)
    refused_before_work(cli("bench", a, "--limit", limit, "--no-hf"), f"--limit {limit}")
    refused_before_work(cli("verify", a, "--backends", "torch,ort", "--limit", limit), f"--limit {limit}")
    refused_before_work(cli("calibrate-tree", a, "--limit", limit, "--out", str(tmp_path / "t.json")),
                        f"--limit {limit}")


def test_bench_refuses_a_missing_artifact_or_no_threads_before_its_progress_bar(artifact, tmp_path):
    refused_before_work(cli("bench", str(tmp_path / "none"), "--limit", "1", "--no-hf"), "does not exist")
    refused_before_work(cli("bench", str(artifact), "--limit", "1", "--no-hf", "--threads", "0"), "--threads 0")
    per_cpu = f"at most {4 * len(os.sched_getaffinity(0))} (4 per CPU"
    refused_before_work(cli("bench", str(artifact), "--limit", "1", "--no-hf", "--threads", "5000"),
                        "--threads 5000", per_cpu)


def test_generate_max_seq_below_one_is_refused(artifact):
    for value in ("0", "-5"):
        refused_before_work(cli("generate", str(artifact), "--prompt", "t1", "--max-seq", value),
                            f"--max-seq {value}", "leave it out")


# ------------------------------------------------------------------------------------------- lanes


def test_bench_concurrency_beyond_the_lanes_is_refused_before_running(artifact):
    lanes = json.loads((artifact / "manifest.json").read_text())["graphs"]["lanes"]["lanes"]
    proc = cli("bench", str(artifact), "--limit", "1", "--no-hf", "--max-new-tokens", "2",
               "--concurrency", str(lanes + 1))
    refused_before_work(proc, f"--concurrency {lanes + 1}", f"({lanes} lanes)", "medusa-export build --max-num-seqs")


def test_engine_names_the_build_option_that_sets_the_lanes(artifact):
    from medusa_export.runtime import MedusaRuntime
    from medusa_export.runtime.engine import Engine

    with MedusaRuntime.load(artifact) as rt:
        lanes = rt.generator.backend.lanes.lanes
        with pytest.raises(InputError, match=rf"`medusa-export build --max-num-seqs {lanes + 1}`"):
            Engine(rt.generator, max_num_seqs=lanes + 1)


def test_build_max_num_seqs_sets_the_lanes(tiny_dirs, tmp_path):
    model_dir, heads_dir = tiny_dirs
    out = tmp_path / "art"
    proc = cli("build", str(model_dir), "--heads", str(heads_dir), "--tree", "chain-2", "--max-seq", "64",
               "--max-num-seqs", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "manifest.json").read_text())["graphs"]["lanes"]["lanes"] == 2
    refused_before_work(cli("build", str(model_dir), "--max-num-seqs", "0", "--out", str(tmp_path / "b")),
                        "--max-num-seqs 0")


@pytest.mark.parametrize("max_seq, needle", [(8, "too small"), (1 << 21, "too large: use at most 1048576")])
def test_build_max_seq_outside_what_loading_takes_is_refused(max_seq, needle):
    """Above the manifest's bound a build wrote an artifact that loading then refused (or failed in torch first)."""
    from medusa_export.runtime.build_options import BuildOptions

    with pytest.raises(InputError, match=needle):
        BuildOptions(max_seq=max_seq)


# ------------------------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize("args, words", [
    # the words typer and click use vary with their versions (typer >= 0.19 is supported): the flag and the help
    (("generate", "--bogus"), ("No such option", "--bogus", "medusa-export generate --help")),
    (("bench",), ("Missing argument", "medusa-export bench --help")),
    (("serve", "x", "--max-num-seqs", "0"), ("Invalid value for", "--max-num-seqs", "medusa-export serve --help")),
    (("generate", "--max-new-tokens", "many"), ("--max-new-tokens", "valid integer")),
])
def test_usage_errors_are_one_line_naming_the_help(args, words):
    """Typer's own checks (unknown options, ranges, missing arguments, types) end like every other bad input: one
    line on stderr, exit code 2, the command's --help named."""
    refused_before_work(cli(*args), *words)


def test_bench_names_a_bad_tree_before_the_artifact_loads(artifact):
    """The progress bar started (and the artifact loaded) before an unknown --tree was refused."""
    refused_before_work(cli("bench", str(artifact), "--tree", "nonsense", "--limit", "1", "--no-hf"),
                        "unknown tree 'nonsense'")


def test_empty_values_are_refused_not_read_as_the_default(artifact):
    """An empty MODEL ran the built-in model and an empty --tree the artifact's own: both refused."""
    refused_before_work(cli("generate", "", "--prompt", "x"), "MODEL is empty")
    refused_before_work(cli("generate", str(artifact), "--tree", "", "--prompt", "x"), "tree (--tree) is empty")
    refused_before_work(cli("serve", "", timeout=120), "artifact directory is empty", "medusa-export build")
    refused_before_work(cli("serve", str(artifact), "--served-model-name", " ", timeout=120),
                        "--served-model-name is empty")
    refused_before_work(cli("serve", str(artifact), "--served-model-name", "x\nserving y", timeout=120),
                        "--served-model-name must be 1 to 256 printable characters")
    # click reads an empty variable as unset: the server started without authentication
    refused_before_work(cli("serve", str(artifact), "--port", "0", timeout=120, env={"MEDUSA_EXPORT_API_KEY": ""}),
                        "--api-key must be a non-empty key")
    refused_before_work(cli("serve", str(artifact), "--threads", "99999", timeout=120), "--threads", "4 per CPU")
    refused_before_work(cli("generate", str(artifact), "--prompt"), "requires an argument",
                        "medusa-export generate --help")
    refused_before_work(cli("bench", str(artifact), "--no-hf", "--model", "x"), "--model is the base model")
    for model, words in (("no-such-model", "not found"), (str(artifact / "heads"), "holds Medusa heads")):
        # named only after the ort rows had run and printed their table
        refused_before_work(cli("bench", str(artifact), "--backends", "ort,torch", "--no-hf", "--limit", "1",
                                "--max-new-tokens", "2", "--model", model), "model", words)
    for blank in ("", "   "):  # ran on an empty user message
        refused_before_work(cli("generate", str(artifact), "--prompt", blank), "--prompt is empty")


@pytest.mark.parametrize("args, flag", [
    (("bench", "ARTIFACT", "--json", ""), "--json"),
    (("bench", "ARTIFACT", "--prompts", ""), "--prompts"),
    (("bench", ""), "ARTIFACT"),
    (("verify", "ARTIFACT", "--json", ""), "--json"),
    (("calibrate-tree", "ARTIFACT", "--out", ""), "--out"),
    (("build", "--out", ""), "--out"),
])
def test_empty_paths_are_refused_not_read_as_the_current_directory(artifact, args, flag):
    """As a path an empty string is ".": `bench --json ''` said '--json . is a directory', a name never typed."""
    args = [str(artifact) if a == "ARTIFACT" else a for a in args]
    refused_before_work(cli(*args), flag, "an empty path")


LONG = "a" * 300  # beyond the system's file name limit: every existence check raised OSError (ENAMETOOLONG)


@pytest.mark.parametrize("args", [("generate", LONG, "--prompt", "x"),
                                  ("generate", "ARTIFACT", "--tree", LONG, "--prompt", "x"),
                                  ("bench", "ARTIFACT", "--prompts", LONG), ("bench", "ARTIFACT", "--json", LONG),
                                  ("build", "--out", f"{LONG}/x")])
def test_a_file_name_beyond_the_systems_limit_is_one_line(artifact, args):
    args = [str(artifact) if a == "ARTIFACT" else a for a in args]
    refused_before_work(cli(*args), "File name too long", "give a shorter path")


def test_help_still_prints_and_exits_0():
    proc = cli("generate", "--help")
    assert proc.returncode == 0 and "--max-new-tokens" in proc.stdout


def test_calibrate_tree_names_its_threads_flag(artifact, tmp_path):
    """It said "threads must be an integer in 1..4096" without the flag, after the prompts were read."""
    refused_before_work(cli("calibrate-tree", str(artifact), "--threads", "0", "--out", str(tmp_path / "t.json")),
                        "--threads 0")
    refused_before_work(cli("calibrate-tree", str(artifact), "--threads", "4096", "--out", str(tmp_path / "t.json")),
                        "--threads 4096", "4 per CPU")  # ran for minutes on 2 cores


def test_a_heads_directory_given_as_the_model_is_named_as_heads(tmp_path):
    """It said "model type None is not supported"."""
    heads = tmp_path / "heads"
    heads.mkdir()
    (heads / "config.json").write_text(json.dumps({"format": "medusa-export-heads", "format_version": 1}))
    proc = cli("generate", str(heads), "--prompt", "x", "--max-new-tokens", "2")
    assert_one_line_error(proc, "holds Medusa heads, not a model", "--heads")


def test_generate_max_seq_past_any_artifacts_is_refused_before_work(artifact):
    refused_before_work(cli("generate", str(artifact), "--prompt", "t1", "--max-seq", "1000000000"),
                        "--max-seq 1000000000", "at most 1048576")


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_quality_prompts_without_quantized_weights_are_refused(tiny_dirs, tmp_path, dtype):
    """`build MODEL --out o --quality-prompts p.jsonl` (fp32) ignored the file without a word: no quality was
    measured, and the user believed it had been."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "t5 t6"}\n')
    proc = cli("build", str(tiny_dirs[0]), "--out", str(tmp_path / "o"), "--dtype", dtype,
               "--quality-prompts", str(prompts))
    assert_one_line_error(proc, "--quality-prompts", f"--dtype {dtype}", "int8 or int4")
    assert not (tmp_path / "o").exists()


def test_calibrate_tree_names_an_unknown_backend_first(tmp_path):
    """`calibrate-tree ART --backend foo --model m` said --model is for --backend torch and that "--backend foo
    runs the artifact's own graphs"; without --model it read the prompts and the tokenizer before refusing."""
    proc = cli("calibrate-tree", str(tmp_path / "art"), "--out", str(tmp_path / "r" / "tree.json"),
               "--backend", "foo", "--model", "m")
    assert_one_line_error(proc, "--backend 'foo'", "torch, ort, trt")
    assert not (tmp_path / "r").exists()


def test_heads_fewer_than_the_default_trees_depth_decode_on_its_paths_they_can_follow(tiny_dirs, tiny_model, tmp_path):
    """Two heads and no --tree: the built-in default tree (three deep) was refused ("has depth 3 but there are only
    2 Medusa heads"), a tree the user never chose. Its paths the heads can follow are used; a tree given is not cut."""
    from conftest import make_heads

    from medusa_export.exporter.heads import save_heads

    heads = save_heads(make_heads(tiny_model, 2, seed=3), tmp_path / "heads2")
    common = ("generate", str(tiny_dirs[0]), "--heads", str(heads), "--prompt", "t1 t2 t3", "--max-new-tokens", "6")
    plain = cli(*common, "--no-medusa")
    proc = cli(*common)
    assert proc.returncode == 0 and plain.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == plain.stdout.splitlines()[0]  # the same text
    assert "note: --heads is not used with --no-medusa" in plain.stderr and "not used" not in proc.stderr
    given = cli(*common, "--tree", "chain-3")
    assert given.returncode == 2 and "2 Medusa heads" in given.stderr, given.stderr


@pytest.mark.parametrize("text, says", [
    ("ort,", "has an empty name between its commas"),  # a name is there: the empty one is the problem
    ("ort,,trt", "has an empty name between its commas"),
    (",", "give at least 1 comma-separated backend name"),
    ("ort,ort", "names ort twice"),
    ("ort,tpu", "unknown backend 'tpu'"),
])
def test_a_backends_list_is_refused_saying_what_is_wrong_with_it(text, says):
    from medusa_export.runtime.cli.checks import backend_list

    with pytest.raises(InputError, match=re.escape(says)):
        backend_list(text)


@pytest.mark.parametrize("blank", ["", "  "])
def test_generate_refuses_blank_heads(tiny_dirs, blank):
    """As a path "" is ".": heads were read from the current directory (run from a heads folder, silently)."""
    model_dir, heads_dir = tiny_dirs
    refused_before_work(cli("generate", str(model_dir), "-p", "t1", "--max-new-tokens", "2", "--heads", blank,
                            cwd=heads_dir), "--heads is empty")


def test_verify_refuses_a_model_without_the_torch_reference(artifact, tiny_dirs):
    """--model is the PyTorch reference's base model: with backends that do not run it, it was silently unused."""
    refused_before_work(cli("verify", str(artifact), "--backends", "ort,trt", "--model", str(tiny_dirs[0]),
                            "--limit", "1"), "--model", "torch")


def test_verify_checks_a_quantized_artifact_against_the_torch_reference_only(tmp_path):
    """With ort first, the PyTorch fp32 model was labelled int8 and measured against ort, and ort's own greedy Medusa
    answers were never compared with its vanilla ones."""
    from manifest_samples import sample_manifest, write_fake_artifact

    art = write_fake_artifact(tmp_path / "art", sample_manifest(weights="int8"))
    refused_before_work(cli("verify", str(art), "--backends", "ort,torch", "--limit", "1"),
                        "an int8 artifact is checked against the PyTorch fp32 reference", "--backends torch,ort")


def test_bench_names_a_missing_tensorrt_before_any_row(portable_artifact, tmp_path):
    """It said so only after every ONNX Runtime row had run (minutes on the real model)."""
    from medusa_export.runtime.backends.trt_availability import check

    if check().ok:
        pytest.skip("TensorRT is usable here")
    refused_before_work(cli("bench", str(portable_artifact), "--no-hf", "--backends", "ort,trt", "--max-new-tokens",
                            "2", "--limit", "1", "--json", str(tmp_path / "b.json")), "TensorRT")
    assert not (tmp_path / "b.json").exists()
