"""Report and output paths (`bench --json / --plot`, `verify --json`, `calibrate-tree --out`, `build --out`) are
checked before any long work: a directory, a path under a file or through a link to nothing, a FIFO, what the command
itself reads; a link to a file is written through, its target's directories made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import cli
from test_cli_inputs import refused_before_work

from medusa_export.runtime.errors import InputError


def test_report_paths_are_checked_before_the_work(artifact, tmp_path):
    missing = tmp_path / "missing" / "x.json"
    a = str(artifact)
    bench = ("bench", a, "--no-hf", "--limit", "1", "--max-new-tokens", "2")
    refused_before_work(cli(*bench, "--json", str(missing)), "--json", "does not exist")
    refused_before_work(cli(*bench, "--json", str(tmp_path)), "--json", "is a directory")
    refused_before_work(cli(*bench, "--plot", str(tmp_path / "missing" / "x.png")), "--plot", "does not exist")
    refused_before_work(cli(*bench, "--plot", str(tmp_path / "x.svg")), "--plot", "give a path ending in .png")
    verify = ("verify", a, "--backends", "ort,torch", "--limit", "1", "--max-new-tokens", "2")
    refused_before_work(cli(*verify, "--json", str(missing)), "--json", "does not exist")
    afile = tmp_path / "afile"
    afile.write_text("x")
    calibrate = ("calibrate-tree", a, "--limit", "1", "--max-new-tokens", "2", "--node-budget", "2")
    refused_before_work(cli(*calibrate, "--out", str(tmp_path)), "--out", "is a directory")
    refused_before_work(cli(*calibrate, "--out", str(afile / "tree.json")), "--out", "is a file")
    for flag, command in (("--out", calibrate), ("--json", bench)):  # written, and named over two lines
        refused_before_work(cli(*command, flag, str(tmp_path / "a\nb.json")), flag, "does not print")
        refused_before_work(cli(*command, flag, "-"), flag, "not to standard output")  # a file named "-" was made
    # a prompts folder holding the report path was named as the report overwriting a file this command reads
    refused_before_work(cli(*bench, "--prompts", str(tmp_path), "--json", str(tmp_path / "r.json")),
                        "prompts file", "is a directory")
    refused_before_work(cli(*calibrate, "--data", str(tmp_path), "--out", str(tmp_path / "t.json")),
                        "prompts file", "is a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # the probes left nothing behind


def test_reports_are_written_through_links_and_never_over_a_fifo(artifact, tmp_path):
    """`bench --json` wrote its report over whatever the path named: a symbolic link became a file, a FIFO (or, as
    root, a device such as /dev/full) was replaced."""
    import os

    bench = ("bench", str(artifact), "--no-hf", "--limit", "1", "--max-new-tokens", "2", "--json")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused_before_work(cli(*bench, str(fifo)), "--json", "not a regular file")
    assert fifo.is_fifo()
    loop_a, loop_b, dangling = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "d.json"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    refused_before_work(cli(*bench, str(loop_a)), "--json", "loop of symbolic links")
    dangling.symlink_to(tmp_path / "missing" / "x.json")
    refused_before_work(cli(*bench, str(dangling)), "--json", "does not exist")
    target, link = tmp_path / "target.json", tmp_path / "link.json"
    target.write_text("old")
    link.symlink_to(target)
    proc = cli(*bench, str(link))
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and json.loads(target.read_text())["results"]


def test_build_out_under_a_file_or_unwritable_is_refused_before_loading(tiny_dirs, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    model_dir, heads_dir = tiny_dirs
    build = ("build", str(model_dir), "--heads", str(heads_dir), "--max-seq", "64")
    refused_before_work(cli(*build, "--out", str(afile / "sub")), "--out", "is a file")
    refused_before_work(cli(*build, "--out", "/proc/medusa-export-test"), "--out", "cannot create files in /proc")
    refused_before_work(cli(*build, "--out", str(tmp_path / "a\nb")), "--out", "control character")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_build_out_of_dot_or_dot_dot_is_refused_before_loading(tiny_dirs, tmp_path):
    """`--out .` (the current directory) or `ART/heads/..` used to pass the first check, run the whole export into a
    work directory made inside the target, and only then fail with a misleading message."""
    model_dir, heads_dir = tiny_dirs
    build = ("build", str(model_dir), "--heads", str(heads_dir), "--max-seq", "64")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused_before_work(cli(*build, "--out", ".", cwd=empty), "--out .", "current directory")
    refused_before_work(cli(*build, "--out", str(empty / "sub" / "..")), "--out", "by its own name", str(empty))
    refused_before_work(cli(*build, "--out", str(tmp_path), cwd=empty), "holds the current directory")
    assert not list(empty.iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_reports_never_overwrite_what_the_command_reads(artifact, tmp_path, tiny_prompts_file):
    """calibrate-tree -o ART/manifest.json and verify --json PROMPTS replaced the artifact's manifest or the
    prompts with their report (exit 0, the artifact destroyed)."""
    before = (artifact / "manifest.json").read_bytes(), Path(tiny_prompts_file).read_bytes()
    cases = [("calibrate-tree", str(artifact), "--data", str(tiny_prompts_file), "--limit", "1", "-o",
              str(artifact / "manifest.json")),
             ("calibrate-tree", str(artifact), "--data", str(tiny_prompts_file), "--limit", "1", "-o",
              str(tiny_prompts_file)),
             ("verify", str(artifact), "--prompts", str(tiny_prompts_file), "--limit", "1", "--json",
              str(artifact / "weights.bin")),
             ("bench", str(artifact), "--prompts", str(tiny_prompts_file), "--limit", "1", "--no-hf", "--json",
              str(tiny_prompts_file))]
    for args in cases:
        refused_before_work(cli(*args), "would overwrite", "which this command reads")
    assert ((artifact / "manifest.json").read_bytes(), Path(tiny_prompts_file).read_bytes()) == before


def test_check_out_file_accepts_a_writable_path_and_leaves_nothing(tmp_path):
    from medusa_export.exporter.output_dir import check_out_file

    check_out_file(tmp_path / "report.json", "--json")
    check_out_file(tmp_path / "new" / "deeper" / "tree.json", "--out", make_parents=True)
    with pytest.raises(InputError, match="does not exist"):
        check_out_file(tmp_path / "new" / "tree.json", "--out")
    assert list(tmp_path.iterdir()) == []


def test_calibrate_tree_out_under_a_file_or_a_dangling_link_is_refused_before_the_measurements(artifact, tmp_path):
    """Both passed the early check (a path folded as text, a link's target not looked at) and failed only when the
    tree was written, after the whole calibration."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing" / "dir")
    for out, words in ((tmp_path / "afile" / ".." / "t.json", "afile is a file, not a directory"),
                       (tmp_path / "dangling" / "t.json", "dangling is a symbolic link to nothing")):
        refused_before_work(cli("calibrate-tree", str(artifact), "--limit", "1", "--out", str(out)), words)
    assert not (tmp_path / "missing").exists()


def test_calibrate_tree_writes_through_a_link_to_a_directory_not_made_yet(tmp_path):
    from medusa_export.exporter.output_dir import check_out_file

    (tmp_path / "tree.json").symlink_to(tmp_path / "later" / "sub" / "tree.json")
    check_out_file(tmp_path / "tree.json", "--out", make_parents=True)  # train_cmd makes the target's parents


def test_calibrate_tree_writes_through_a_missing_directory_and_back(artifact, tmp_path):
    """``missing/../t.json``: the directory is made, then walked back out of, as the system walks the path (folding
    it as text first made nothing, and the write failed after the measurements)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "t5 t6 t7"}\n')
    out = tmp_path / "missing" / ".." / "t.json"
    proc = cli("calibrate-tree", str(artifact), "--data", str(prompts), "--out", str(out), "--max-new-tokens", "4",
               "--node-budget", "3")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "t.json").read_text())["calibration"]["prompts"] == 1


def test_a_report_whose_write_fails_leaves_no_directory_it_made(tmp_path, monkeypatch):
    """calibrate-tree --out deep/er/tree.json on a full disk left deep/er/ behind."""
    import errno

    from medusa_export.runtime import whole_file

    whole_file.write_report(tmp_path / "missing" / ".." / "a" / "b" / "t.json", "{}", make_parents=True)
    assert (tmp_path / "a" / "b" / "t.json").read_text() == "{}" and (tmp_path / "missing").is_dir()

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(whole_file, "write_whole", full)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(OSError, match="No space left"):
        whole_file.write_report(tmp_path / "a" / "deep" / "er" / "t.json", "{}", make_parents=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # a/ was there: it stays
    monkeypatch.undo()
    real_mkdir, calls = Path.mkdir, []

    def mkdir_fails_deeper(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir_fails_deeper)
    with pytest.raises(OSError, match="No space left"):
        whole_file.write_report(tmp_path / "x" / "y" / "t.json", "{}", make_parents=True)
    assert not (tmp_path / "x").exists()


def test_links_are_followed_alike_on_every_python(tmp_path):
    """Python 3.13's Path.resolve() returns a loop of links as a path instead of failing: follow_links fails for
    it there as before (an artifact file and a report path through a loop are refused, not read or replaced)."""
    import errno

    from medusa_export.runtime.links import follow_links

    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(OSError) as e:
        follow_links(tmp_path / "a")
    assert e.value.errno == errno.ELOOP
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to("file")
    (tmp_path / "dangling").symlink_to("nowhere/x")
    assert follow_links(tmp_path / "link") == tmp_path.resolve() / "file"
    assert follow_links(tmp_path / "dangling") == tmp_path.resolve() / "nowhere" / "x"
    assert follow_links(tmp_path / "absent" / "y") == tmp_path.resolve() / "absent" / "y"


def test_a_link_under_a_file_is_named_so_not_as_a_loop(tmp_path):
    """follow_links failed for every error strict resolution meets, so a report path through a link into a file's
    "directory" was called a loop of symbolic links."""
    from medusa_export.exporter.output_dir import check_out_file
    from medusa_export.runtime.errors import InputError

    (tmp_path / "afile").write_text("x")
    (tmp_path / "link.json").symlink_to(tmp_path / "afile" / "x")
    with pytest.raises(InputError, match="afile is a file") as e:
        check_out_file(tmp_path / "link.json", "--json")
    assert "loop" not in str(e.value)
