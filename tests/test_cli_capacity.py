"""Options checked against the artifact before the work, in one line: --max-new-tokens against max_seq (bench,
verify), verify's --tolerance, calibrate-tree's --node-budget, prompt lengths and --model; and the bench plot of
rows without steps."""

from __future__ import annotations

import json

import pytest
from test_cli import cli
from test_cli_inputs import refused_before_work

from medusa_export.runtime.errors import InputError


def prompts_file(tmp_path, *prompts: str, name: str = "p.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def prompt_tokens(artifact, text: str) -> int:
    """Tokens of ``text`` as bench and verify encode it (the chat template, when the artifact has one)."""
    from medusa_export.runtime.manifest import Manifest
    from medusa_export.runtime.tokenizer import ChatTokenizer

    return len(ChatTokenizer.from_artifact(artifact, Manifest.read(artifact)).encode_prompt(text, chat=True))


def max_seq(artifact) -> int:
    return json.loads((artifact / "manifest.json").read_text())["max_seq"]


# ------------------------------------------------------------------------------------------- bench


def test_bench_refuses_answers_beyond_max_seq_before_any_row(artifact, tmp_path):
    """The batched rows refused such a request only after every single-stream row, and no JSON was written."""
    prompts = prompts_file(tmp_path, "t5 t6 t7", "t9 t8 t7 t6 t5 t4")
    room = max_seq(artifact) - prompt_tokens(artifact, "t9 t8 t7 t6 t5 t4")
    report = tmp_path / "b.json"
    proc = cli("bench", str(artifact), "--prompts", str(prompts), "--no-hf", "--concurrency", "2",
               "--max-new-tokens", str(room + 1), "--json", str(report))
    refused_before_work(proc, f"--max-new-tokens {room + 1}", "prompt 2", f"max_seq {max_seq(artifact)}",
                        f"--max-new-tokens {room} or less")
    assert not report.exists()


def test_bench_at_max_seq_runs_every_row_alike(artifact, tmp_path):
    """At the largest --max-new-tokens that fits, single-stream and batched rows decode the same answers."""
    prompts = prompts_file(tmp_path, "t9 t8 t7 t6 t5 t4")
    room = max_seq(artifact) - prompt_tokens(artifact, "t9 t8 t7 t6 t5 t4")
    report = tmp_path / "b.json"
    proc = cli("bench", str(artifact), "--prompts", str(prompts), "--no-hf", "--concurrency", "2",
               "--max-new-tokens", str(room), "--json", str(report))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(report.read_text())["results"]
    # one prompt on two lanes: its batched rows are labelled by the one sequence that ran
    assert {r["mode"] for r in rows} >= {"vanilla", "vanilla x1", "medusa+context x1"}
    assert all(r["identical_to_vanilla"] for r in rows), rows


def test_run_bench_checks_the_room_before_loading(artifact, monkeypatch):
    from medusa_export.runtime import api
    from medusa_export.runtime.bench import run_bench

    def no_load(*_a, **_k):
        raise AssertionError("the runtime loaded before the check")

    monkeypatch.setattr(api.MedusaRuntime, "load", no_load)
    with pytest.raises(InputError, match=r"--max-new-tokens 500: prompt 1 .* max_seq 128"):
        run_bench(artifact, ["ort"], ["t1 t2"], max_new_tokens=500)


def test_bench_refuses_a_backend_the_artifact_cannot_run_before_any_row(artifact, tmp_path):
    """`--backends ort,trt` on a fused artifact: TensorRT cannot parse its graphs, which the manifest says. That was
    found only after the ONNX Runtime rows had run; it is one line before any (rows measured before a later failure
    are kept: `test_bench_keeps_each_row_as_it_is_measured`)."""
    from test_cli import assert_one_line_error, cli

    report = tmp_path / "bench.json"
    proc = cli("bench", str(artifact), "--backends", "ort,trt", "--no-hf", "--limit", "1", "--max-new-tokens", "3",
               "--json", str(report))
    assert_one_line_error(proc, "fused operators TensorRT cannot parse", "--engine trt")
    assert not report.exists()


def test_bench_keeps_each_row_as_it_is_measured(artifact, tmp_path):
    """One backend whose batched rows fail (its lanes graph's outputs of another type than the I/O table's, found
    when that graph opens at the first batched step; its names, and a truncated file, are checked at load, before
    any row): the single-stream rows measured before are in --json, with why it stopped."""
    import hashlib
    import shutil

    import onnx
    from test_cli import cli

    art = shutil.copytree(artifact, tmp_path / "art")
    lanes = art / "lanes.onnx"
    graph = onnx.load(str(lanes), load_external_data=False)  # its weights stay in weights.bin
    for output in graph.graph.output:  # the names the table wants, declared as doubles
        output.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    lanes.write_bytes(graph.SerializeToString())
    m = json.loads((art / "manifest.json").read_text())
    m["files"]["lanes.onnx"] = {"bytes": lanes.stat().st_size, "sha256": hashlib.sha256(lanes.read_bytes()).hexdigest()}
    (art / "manifest.json").write_text(json.dumps(m))
    report = tmp_path / "bench.json"
    proc = cli("bench", str(art), "--no-hf", "--limit", "1", "--max-new-tokens", "3", "--concurrency", "2",
               "--json", str(report))
    assert proc.returncode == 2 and "lanes.onnx" in proc.stderr, proc.stderr
    # the rows measured before it stopped are on the screen too, not only in the report
    assert [line.split()[1] for line in proc.stdout.splitlines()[-3:]] == ["vanilla", "medusa", "medusa+context"]
    saved = json.loads(report.read_text())
    assert [r["mode"] for r in saved["results"]] == ["vanilla", "medusa", "medusa+context"]
    assert "lanes.onnx" in saved["incomplete"] and list(tmp_path.glob(".bench.json.tmp-*")) == []


def test_a_report_saved_before_the_end_says_the_run_had_not_finished(artifact):
    """Each row's save is marked until the run ends: a full disk or a killed process at the next write leaves a file
    that says so, not one that reads as a finished report."""
    from medusa_export.runtime.bench import RUNNING, run_bench

    saves = []
    final = run_bench(artifact, ["ort"], ["t1 t2"], max_new_tokens=3,
                      measured=lambda r: saves.append((len(r["results"]), r.get("incomplete"))))
    assert saves == [(1, RUNNING), (2, RUNNING), (3, RUNNING)]
    assert "incomplete" not in final and len(final["results"]) == 3


def test_a_failed_whole_write_names_its_file_and_leaves_nothing(tmp_path):
    import errno

    from medusa_export.runtime.whole_file import write_whole

    target = tmp_path / "report.json"
    target.write_text("old")

    def full_disk(f):
        f.write(b"{")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left on device") as caught:
        write_whole(target, full_disk)
    assert caught.value.filename == str(target) and caught.value.errno == errno.ENOSPC
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_plot_draws_rows_without_steps(tmp_path):
    """With --max-new-tokens 1 every answer ends at the prefill's token: no steps, mean_accepted None."""
    pytest.importorskip("matplotlib")
    from medusa_export.runtime.bench import plot

    row = {"backend": "ort", "tokens_per_s": 12.5, "mean_accepted": None}
    report = {"model": "m", "prompts": 2, "max_new_tokens": 1,
              "results": [{**row, "mode": "vanilla"}, {**row, "mode": "medusa"}, {**row, "mode": "medusa x2"}]}
    plot(report, tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_the_plot_draws_batched_vanilla_rows_as_vanilla(tmp_path, monkeypatch):
    """"vanilla x2" was drawn in the speculating rows' colour, with an accepted-tokens note."""
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    from medusa_export.runtime.bench import plot

    drawn: dict = {"notes": []}
    bar, annotate = Axes.bar, Axes.annotate

    def bars(self, x, height, color, **kwargs):
        drawn["colors"] = color
        return bar(self, x, height, color=color, **kwargs)

    def notes(self, text, *args, **kwargs):
        drawn["notes"].append(text)
        return annotate(self, text, *args, **kwargs)

    monkeypatch.setattr(Axes, "bar", bars)
    monkeypatch.setattr(Axes, "annotate", notes)
    row = {"backend": "ort", "tokens_per_s": 12.5, "mean_accepted": 1.5}
    modes = ["vanilla", "medusa", "vanilla x2", "medusa+context x2"]
    plot({"model": "m", "prompts": 2, "max_new_tokens": 8, "results": [{**row, "mode": m} for m in modes]},
         tmp_path / "b.png")
    assert drawn["colors"][0] == drawn["colors"][2] != drawn["colors"][1] == drawn["colors"][3]
    assert ["acc" in note for note in drawn["notes"]] == [False, True, False, True]


def test_bench_plot_with_one_new_token(artifact, tmp_path):
    pytest.importorskip("matplotlib")
    proc = cli("bench", str(artifact), "--limit", "1", "--no-hf", "--max-new-tokens", "1", "--plot",
               str(tmp_path / "b.png"))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert (tmp_path / "b.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------------- verify


def test_verify_refuses_new_tokens_that_cannot_fit_or_none(artifact, tmp_path):
    a = str(artifact)
    prompts = prompts_file(tmp_path, "t5 t6 t7")
    room = max_seq(artifact) - prompt_tokens(artifact, "t5 t6 t7")
    refused_before_work(cli("verify", a, "--backends", "ort,torch", "--prompts", str(prompts), "--max-new-tokens",
                            "500"), "--max-new-tokens 500", f"max_seq {max_seq(artifact)}",
                        f"--max-new-tokens {room} or less")
    for value in ("0", "-3"):
        refused_before_work(cli("verify", a, "--backends", "ort,torch", "--max-new-tokens", value),
                            f"--max-new-tokens {value}", "1 or more")


@pytest.mark.parametrize("value", ["nan", "-1", "inf"])
def test_verify_refuses_a_tolerance_no_error_can_meet(artifact, value):
    """A NaN tolerance failed every comparison (MISMATCH, exit 1); a negative one could never pass."""
    refused_before_work(cli("verify", str(artifact), "--backends", "ort,torch", "--limit", "1", "--tolerance", value),
                        "--tolerance", "finite number of 0 or more")


def test_compare_backends_scores_answers_that_ran_to_the_capacity(artifact):
    """An answer ended by the KV capacity is one token longer than fits one forward: the teacher-forced pass
    scores the positions that fit (it failed inside ONNX Runtime)."""
    from medusa_export.runtime import MedusaRuntime
    from medusa_export.runtime.compare import compare_backends, teacher_forced

    with MedusaRuntime.load(artifact) as a, MedusaRuntime.load(artifact) as b:
        report = compare_backends({"ort": a.generator, "again": b.generator}, ["t5 t6 t7"], max_new_tokens=500)
        assert report["summary"]["again"]["ok"] is True
        assert report["rows"][0]["teacher_forced_tokens"] == max_seq(artifact)
        with pytest.raises(InputError, match="exceeds the maximum sequence of 128"):
            teacher_forced(a.generator, [5] * (max_seq(artifact) + 1))


# ------------------------------------------------------------------------------------------- calibrate-tree


def test_calibrate_tree_refuses_a_node_budget_beyond_max_seq_before_decoding(artifact, tmp_path):
    out = tmp_path / "tree.json"
    n = max_seq(artifact)
    refused_before_work(cli("calibrate-tree", str(artifact), "--limit", "1", "--node-budget", str(n - 1), "--out",
                            str(out)), f"--node-budget {n - 1}", f"max_seq {n}", f"--node-budget {n - 2} or less")
    assert not out.exists()


def test_calibrate_tree_names_the_file_and_line_of_a_long_prompt_before_decoding(artifact, tmp_path):
    data = tmp_path / "cal.jsonl"
    long = " ".join(f"t{i % 300 + 1}" for i in range(200))
    data.write_text(json.dumps({"prompt": "t1 t2"}) + "\n\n" + json.dumps({"prompt": long}) + "\n")
    out = tmp_path / "tree.json"
    refused_before_work(cli("calibrate-tree", str(artifact), "--data", str(data), "--out", str(out)),
                        f"{data} line 3", f"max_seq {max_seq(artifact)}")
    assert not out.exists()


def test_calibrate_tree_torch_backend_takes_model(artifact, tiny_dirs, tmp_path):
    """On a machine that has not loaded the base model, the error asks for --model PATH, which calibrate-tree
    must then take."""
    pytest.importorskip("torch")
    fresh = {"MEDUSA_EXPORT_CACHE": str(tmp_path / "cache")}
    args = ("calibrate-tree", str(artifact), "--backend", "torch", "--limit", "1", "--max-new-tokens", "4",
            "--node-budget", "3")
    out = tmp_path / "tree.json"
    refused = cli(*args, "--out", str(out), env=fresh)
    assert refused.returncode == 2 and "--model PATH" in refused.stderr, refused.stderr
    proc = cli(*args, "--model", str(tiny_dirs[0]), "--out", str(out), env=fresh)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["calibration"]["backend"] == "torch"
    refused_before_work(cli("calibrate-tree", str(artifact), "--model", str(tiny_dirs[0]), "--out",
                            str(tmp_path / "t2.json")), "--model", "--backend torch")


def test_bench_says_when_its_concurrent_rows_are_not_batched(portable_artifact):
    """A portable artifact on ONNX Runtime has no lanes graph: its xN rows run the requests in turn, and the report
    says so instead of passing them off as batched."""
    from medusa_export.runtime.bench import run_bench

    report = run_bench(portable_artifact, ["ort"], ["t5 t6 t7", "t1 t2"], max_new_tokens=3, concurrency=2)
    assert any("no batched steps" in n and "x2 rows take their requests in turn" in n for n in report["notes"])
    assert any(r["mode"].endswith(" x2") for r in report["results"])


def test_a_concurrent_row_is_labelled_by_the_requests_that_could_run_together(artifact):
    """Two prompts on four lanes never make a batch of four: the row says x2 and keeps the lanes asked for."""
    from medusa_export.runtime.bench import run_bench

    report = run_bench(artifact, ["ort"], ["t5 t6 t7", "t1 t2"], max_new_tokens=3, concurrency=4)
    rows = [r for r in report["results"] if r.get("concurrency")]
    assert rows and all(r["mode"].endswith(" x2") and r["concurrency"] == 4 and r["mean_batch"] <= 2 for r in rows)


def test_the_plot_is_a_png_at_exactly_its_path_written_whole(tmp_path, monkeypatch):
    """matplotlib added .png to a name without a suffix (a path no check had seen: it overwrote a --json report named
    r.png) and wrote in place (Ctrl-C mid-write left an empty file where the last chart was)."""
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    from medusa_export.runtime.bench import plot

    report = {"model": "m", "prompts": 1, "max_new_tokens": 2,
              "results": [{"backend": "ort", "mode": "vanilla", "tokens_per_s": 10.0, "mean_accepted": 1.0}]}
    plot(report, tmp_path / "chart")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chart"]
    assert (tmp_path / "chart").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def interrupted(self, fname, **kwargs):
        fname.write(b"\x89PNG half")
        raise KeyboardInterrupt
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", interrupted)
    (tmp_path / "old.png").write_bytes(b"the previous chart")
    with pytest.raises(KeyboardInterrupt):
        plot(report, tmp_path / "old.png")
    assert (tmp_path / "old.png").read_bytes() == b"the previous chart"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chart", "old.png"]
