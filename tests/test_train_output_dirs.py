"""Where `train-heads` writes: never over its inputs (MODEL, --data, --init-heads) nor inside a built artifact, never
into a work directory OUT.partial it did not make, one run at a time per --out (the lock itself:
test_train_out_lock.py), the distillation cache outside --out and the model, and Medusa-2's warm-up reused only for
the same model and result-changing settings."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from medusa_export.exporter.train_out_dir import TRAIN_LOCK, TRAIN_WORK_MARK, check_train_out_dir, train_work_dir
from medusa_export.runtime.errors import InputError


def _medusa2_dir(path: Path) -> Path:
    """What check_train_out_dir takes for an earlier Medusa-2 output (config.json + training.json)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "medusa_num_heads": 2}))
    (path / "training.json").write_text(json.dumps({"mode": "medusa2"}))
    return path


@pytest.fixture
def invoke(monkeypatch):
    """The CLI in this process with both trainers replaced by stubs that record their calls (nothing trains)."""
    pytest.importorskip("torch")
    from typer.testing import CliRunner

    from medusa_export.exporter.training import medusa2 as m2
    from medusa_export.exporter.training import train as train_mod
    from medusa_export.runtime.cli.app import _register, app

    calls = []
    monkeypatch.setattr(train_mod, "train_heads", lambda *a: calls.append(a) or {})
    monkeypatch.setattr(m2, "train_medusa2", lambda *a: calls.append(a) or {})
    _register()

    def run(*args: str):
        result = CliRunner().invoke(app, ["train-heads", *map(str, args)])
        return result, calls

    return run


def _refused(result, calls, *words: str) -> None:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert calls == []  # refused before any training


# ------------------------------------------------------------------------------- 1: outputs never overwrite inputs

def test_data_file_that_medusa1_writes_into_out_is_refused(invoke, tiny_dirs, tmp_path):
    out = tmp_path / "heads"
    shutil.copytree(tiny_dirs[1], out)
    data = out / "heldout_prompts.jsonl"
    data.write_text('{"prompt": "a b c"}\n')
    _refused(*invoke(tiny_dirs[0], "--data", data, "--out", out, "--heldout-fraction", "0"),
             "--data", "heldout_prompts.jsonl", "choose another --out")
    assert data.read_text() == '{"prompt": "a b c"}\n'
    # a link in OUT under a written name leads to the input just the same
    elsewhere = tmp_path / "prompts.jsonl"
    elsewhere.write_text('{"prompt": "x"}\n')
    data.unlink()
    data.symlink_to(elsewhere)
    with pytest.raises(InputError, match="--data"):
        check_train_out_dir(out, "medusa1", {"--data": elsewhere})
    # beside OUT, or inside OUT under a name Medusa-1 never writes: nothing is overwritten
    check_train_out_dir(out, "medusa1", {"--data": tmp_path / "other.jsonl", "MODEL": tiny_dirs[0]})


def test_medusa2_model_that_is_or_lies_in_out_is_refused(invoke, tmp_path):
    m2b = _medusa2_dir(tmp_path / "m2b")
    before = sorted(p.name for p in m2b.iterdir())
    _refused(*invoke(m2b, "--data", tmp_path / "p.jsonl", "--mode", "medusa2", "--out", m2b), "MODEL", "--out")
    assert sorted(p.name for p in m2b.iterdir()) == before
    outer = _medusa2_dir(tmp_path / "outer")
    inner = _medusa2_dir(outer / "base")
    with pytest.raises(InputError, match="MODEL"):  # replaced whole with OUT
        check_train_out_dir(outer, "medusa2", {"MODEL": inner})
    check_train_out_dir(inner, "medusa2", {"MODEL": outer})  # OUT inside the model: new entries, nothing replaced
    work = train_work_dir(tmp_path / "new", fresh=False)
    (work / "prompts.jsonl").write_text("{}\n")
    with pytest.raises(InputError, match="--data"):  # OUT.partial is removed at the end (and by --no-resume)
        check_train_out_dir(tmp_path / "new", "medusa2", {"--data": work / "prompts.jsonl"})
    with pytest.raises(InputError, match="--init-heads"):
        check_train_out_dir(tmp_path / "new", "medusa2", {"--init-heads": work})


def test_library_medusa2_refuses_its_model_as_out(tmp_path):
    pytest.importorskip("torch")
    from medusa_export.exporter.training.medusa2 import train_medusa2

    m2b = _medusa2_dir(tmp_path / "m2b")
    with pytest.raises(InputError, match="MODEL"):
        train_medusa2(str(m2b), "sharegpt", m2b)
    assert (m2b / "config.json").exists() and not (tmp_path / "m2b.partial").exists()


def test_library_medusa1_refuses_its_data_where_it_writes_and_takes_the_lock(tiny_dirs, tmp_path):
    """train_heads() called from Python makes the CLI's checks: its data file is one it would overwrite."""
    pytest.importorskip("torch")
    from medusa_export.exporter.train_out_dir import TRAIN_LOCK
    from medusa_export.exporter.training.train import train_heads

    out = tmp_path / "h"
    out.mkdir()
    data = out / "heldout_prompts.jsonl"
    data.write_text('{"prompt": "t5 t6"}\n')
    with pytest.raises(InputError, match="--data"):
        train_heads(str(tiny_dirs[0]), data, out)
    assert data.read_text() == '{"prompt": "t5 t6"}\n' and not (out / TRAIN_LOCK).exists()


# --------------------------------------------------------------------- 2: OUT.partial only when train-heads made it

def test_a_foreign_partial_directory_or_file_is_refused_and_kept(invoke, tmp_path):
    out = tmp_path / "foo"
    mine = tmp_path / "foo.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    _refused(*invoke("m", "--data", tmp_path / "p.jsonl", "--mode", "medusa2", "--out", out, "--no-resume"),
             "foo.partial", "remove or rename it")
    assert (mine / "notes.txt").read_text() == "mine" and not out.exists()
    with pytest.raises(InputError, match="remove or rename"):
        train_work_dir(out, fresh=True)
    assert (mine / "notes.txt").exists()
    shutil.rmtree(mine)
    mine.write_text("a file")
    _refused(*invoke("m", "--data", tmp_path / "p.jsonl", "--mode", "medusa2", "--out", out), "foo.partial")
    assert mine.read_text() == "a file"


def test_its_own_partial_directory_is_resumed_or_made_anew(tmp_path):
    out = tmp_path / "m"
    work = train_work_dir(out, fresh=False)
    assert (work / TRAIN_WORK_MARK).is_file()
    (work / "checkpoint.pt").write_bytes(b"state")
    check_train_out_dir(out, "medusa2")
    assert (train_work_dir(out, fresh=False) / "checkpoint.pt").exists()  # resumed
    assert not (train_work_dir(out, fresh=True) / "checkpoint.pt").exists()  # --no-resume: ours, so removed


def test_a_medusa2_run_leaves_neither_mark_nor_lock_nor_partial(make_tokenizer, tiny_prompts_file, tmp_path,
                                                                torch_single_thread):
    pytest.importorskip("peft")
    from conftest import loaded_tiny

    from medusa_export.exporter.training.medusa2 import train_medusa2
    from medusa_export.runtime.training_options import Medusa1Options, Medusa2Options

    m1 = Medusa1Options(num_heads=2, max_new_tokens=8, gen_batch_size=8, heldout_fraction=0.25, progress=False,
                        epochs=1, cache_dir=tmp_path / "cache")
    out = tmp_path / "m"
    for _ in range(2):  # the second replaces the first's model directory
        train_medusa2(loaded_tiny(make_tokenizer), tiny_prompts_file, out, m1, Medusa2Options(joint_epochs=1))
        names = {p.name for p in out.iterdir()}
        assert "config.json" in names and TRAIN_WORK_MARK not in names and TRAIN_LOCK not in names
        assert not (tmp_path / "m.partial").exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("m.old")] == []


def test_a_medusa2_run_stopped_just_before_its_swap_is_resumed_not_refused(make_tokenizer, tiny_prompts_file,
                                                                          tmp_path, torch_single_thread, monkeypatch):
    """Its work directory's mark was removed before the swap: Ctrl-C there left a finished OUT.partial that the
    next run refused as "not its own" (remove it by hand, and the run with it)."""
    pytest.importorskip("peft")
    from conftest import loaded_tiny

    from medusa_export.exporter.training import medusa2
    from medusa_export.runtime.training_options import Medusa1Options, Medusa2Options

    m1 = Medusa1Options(num_heads=2, max_new_tokens=8, gen_batch_size=8, heldout_fraction=0.25, progress=False,
                        epochs=1, cache_dir=tmp_path / "cache")
    out = tmp_path / "m"

    def interrupted(*_a):
        raise KeyboardInterrupt

    monkeypatch.setattr(medusa2, "swap_in", interrupted)
    with pytest.raises(KeyboardInterrupt):
        medusa2.train_medusa2(loaded_tiny(make_tokenizer), tiny_prompts_file, out, m1, Medusa2Options(joint_epochs=1))
    monkeypatch.undo()
    assert (tmp_path / "m.partial" / TRAIN_WORK_MARK).is_file()
    check_train_out_dir(out, "medusa2")  # its own: taken up again
    medusa2.train_medusa2(loaded_tiny(make_tokenizer), tiny_prompts_file, out, m1, Medusa2Options(joint_epochs=1))
    assert (out / "config.json").is_file() and not (out / TRAIN_WORK_MARK).exists()
    assert not (tmp_path / "m.partial").exists()


# ------------------------------------------------------------------------------------------- 3: one run per --out

def test_a_second_run_on_the_same_out_is_refused(invoke, tmp_path):
    out = tmp_path / "conc"
    code = ("import sys; from pathlib import Path; from medusa_export.exporter.train_out_dir import train_out_lock\n"
            "with train_out_lock(Path(sys.argv[1])):\n    print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert (out / TRAIN_LOCK).exists()
        check_train_out_dir(out, "medusa1")  # its lock file is train-heads' own
        check_train_out_dir(out, "medusa2")
        for mode in ("medusa1", "medusa2"):
            _refused(*invoke("m", "--data", tmp_path / "p.jsonl", "--mode", mode, "--out", out),
                     f"another train-heads is writing {out}", "wait for it or choose another --out")
    finally:
        holder.communicate("", timeout=30)
    assert not out.exists()  # the holder made it and wrote nothing else: removed with its lock file
    result, calls = invoke("m", "--data", tmp_path / "p.jsonl", "--out", out)
    assert result.exit_code == 0 and len(calls) == 1, result.output
    assert not out.exists()


# --------------------------------------------------------------------------------- 5: the cache in OUT or MODEL

@pytest.mark.parametrize("mode", ["medusa1", "medusa2"])
def test_cache_dir_in_out_or_the_model_is_refused(invoke, tiny_dirs, tmp_path, mode):
    model = tmp_path / "model"
    shutil.copytree(tiny_dirs[0], model)
    out = tmp_path / "o"
    for cache in (out, out / "cache", model, model / "cache"):
        _refused(*invoke(model, "--data", tmp_path / "p.jsonl", "--mode", mode, "--out", out, "--cache-dir", cache),
                 "--cache-dir", "outside it")
    assert not (model / "cache").exists() and not out.exists()
    check_train_out_dir(out, mode, {"MODEL": model}, tmp_path / "cache")


# ------------------------------------------------------------------------------ 4: the warm-up's reuse key

def test_warm_up_is_reused_for_the_same_model_only_whatever_the_threads(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from medusa_export.exporter.training import medusa2 as m2
    from medusa_export.runtime.training_options import Medusa1Options

    trained = []

    def fake_train_heads(loaded, data, heads_dir, m1):
        trained.append(loaded.identity["sha256_16"])
        Path(heads_dir).mkdir(parents=True, exist_ok=True)
        return {"heldout": {"top1": [0.5]}}

    monkeypatch.setattr(m2, "train_heads", fake_train_heads)

    class Loaded:
        def __init__(self, sha):
            self.identity = {"name": "tiny", "sha256_16": sha}

    heads = tmp_path / "m.partial" / "warmup-heads"
    m1 = Medusa1Options(epochs=1, progress=False)

    def warm(loaded, o, data_sha="d1"):
        return m2._warm_up(loaded, "p.jsonl", data_sha, heads, o, 0, 1, lambda _m: None)

    warm(Loaded("a"), m1)
    warm(Loaded("a"), replace(m1, threads=3, progress=True, checkpoint_every_s=5.0, cache_dir=tmp_path / "c"))
    assert trained == ["a"]  # nothing that changes the heads changed
    warm(Loaded("b"), m1)
    assert trained == ["a", "b"]  # another base model: its own warm-up
    warm(Loaded("b"), m1, data_sha="d2")
    warm(Loaded("b"), replace(m1, epochs=2), data_sha="d2")
    assert trained == ["a", "b", "b", "b"]


def test_more_threads_than_the_cpus_take_are_refused_before_training(invoke, tmp_path, monkeypatch):
    """`train-heads --threads 4096` on a 2-core machine passed (the generic bound is 4,096) and distilled for hours
    at a crawl; generate, bench and serve refuse more than 4 per CPU."""
    from medusa_export.runtime import machine

    monkeypatch.setattr(machine, "usable_cpus", lambda: 2)
    _refused(*invoke("--data", tmp_path / "p.jsonl", "--out", tmp_path / "o", "--threads", "4096"),
             "--threads 4096", "at most 8")
    assert not (tmp_path / "o").exists()


def test_medusa2_out_that_is_the_current_directory_or_has_no_name_is_refused(invoke, tmp_path, monkeypatch):
    """`train-heads --mode medusa2 --out .` (in an empty directory) ended in a ValueError traceback from
    OUT.partial's name; had it run, the swap would have replaced the current directory whole."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    (tmp_path / "p.jsonl").write_text('{"prompt": "hello"}\n')
    _refused(*invoke("--data", tmp_path / "p.jsonl", "--mode", "medusa2", "--out", "."), "--out .",
             "current directory")
    (tmp_path / "other" / "sub").mkdir(parents=True)
    with pytest.raises(InputError, match=r"^--out .*sub/\.\. does not name a directory by its own name: give it as "
                                         r".*other$"):
        check_train_out_dir(Path("..") / "other" / "sub" / "..", "medusa2")  # OUT.partial would land in sub
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "other", "p.jsonl"]


@pytest.mark.parametrize("mode", ["medusa1", "medusa2"])
def test_an_out_name_that_does_not_print_is_refused(invoke, tmp_path, mode):
    """build refused a newline in --out; train-heads wrote it into training.json and every line naming it."""
    _refused(*invoke("--data", tmp_path / "p.jsonl", "--mode", mode, "--out", tmp_path / "a\nb"),
             "does not print")
    assert not (tmp_path / "a\nb").exists()


def test_medusa2_out_that_is_a_symbolic_link_is_refused(invoke, tmp_path):
    """The swap renamed the link aside and put a directory in its place: the directory it pointed at never got the
    model, and OUT.old-* (the link, which rmtree does not remove) stayed behind."""
    target = _medusa2_dir(tmp_path / "real")
    (tmp_path / "link").symlink_to(target)
    _refused(*invoke("--data", tmp_path / "p.jsonl", "--mode", "medusa2", "--out", tmp_path / "link"),
             "is a symbolic link")
    assert (tmp_path / "link").is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_another_ranks_writability_probe_in_out_is_not_content(tmp_path):
    """torchrun starts every rank's checks at once: one rank's probe (an empty directory made and removed in --out)
    read as content to another, which refused --out as "not empty" (a failure seen once in test_medusa2's run)."""
    from medusa_export.exporter.output_dir import PROBE_PREFIX

    out = tmp_path / "m2"
    out.mkdir()
    (out / TRAIN_LOCK).write_text("")
    (out / f"{PROBE_PREFIX}abc").mkdir()
    check_train_out_dir(out, "medusa2")
    check_train_out_dir(out, "medusa1")
    (out / "other").write_text("x")
    with pytest.raises(InputError, match="is not empty"):
        check_train_out_dir(out, "medusa2")


@pytest.mark.parametrize("mode", ["medusa1", "medusa2"])
def test_an_out_inside_an_artifact_is_refused(invoke, artifact, tiny_dirs, tmp_path, mode):
    """An artifact's heads/ folder looks like a heads directory of ours: heads written there replaced files its
    manifest lists with their sizes and hashes, and the artifact no longer loaded."""
    art = shutil.copytree(artifact, tmp_path / "art")
    before = (art / "heads" / "config.json").read_bytes()
    for out in (art / "heads", art / "new"):
        _refused(*invoke(tiny_dirs[0], "--data", tmp_path / "p.jsonl", "--mode", mode, "--out", out),
                 "--out", "inside the artifact")
    assert (art / "heads" / "config.json").read_bytes() == before and not (art / "new").exists()


@pytest.mark.parametrize("bad", ["data", "exclude_eval", "init_heads"])
def test_medusa2_refusing_an_input_leaves_no_work_directory(tiny_dirs, tmp_path, bad):
    """A bad --data, --exclude-eval or --init-heads was refused after OUT.partial was made, marked as a run's own:
    a command that never started left it behind."""
    from test_cli import assert_one_line_error, cli

    good, broken = tmp_path / "p.jsonl", tmp_path / "bad.jsonl"
    good.write_text('{"prompt": "t1 t2"}\n')
    broken.write_text('{"prompt": "t1"}\n{oops\n')
    args = ["train-heads", str(tiny_dirs[0]), "--mode", "medusa2", "--out", str(tmp_path / "m"), "--data",
            str(broken if bad == "data" else good)]
    args += {"data": [], "exclude_eval": ["--exclude-eval", str(broken)],
             "init_heads": ["--init-heads", str(tmp_path)]}[bad]  # a directory without heads weights
    assert_one_line_error(cli(*args))
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()
