"""SIGTERM stops a command the way Ctrl-C does: the same cleanup runs (a build leaves no OUT.partial-*)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading

from conftest import artifact_tree_file


def _lines(stream) -> queue.Queue:
    """The stream's lines on a queue, read by a thread: the test waits on them with a timeout."""
    q: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [q.put(line) for line in stream] + [q.put(None)], daemon=True).start()
    return q


def test_sigterm_during_build_removes_the_partial_directory(tiny_dirs, tmp_path):
    model_dir, heads_dir = tiny_dirs
    out = tmp_path / "art"
    code = "import sys; from medusa_export.runtime.cli.app import main; sys.argv[0] = 'medusa-export'; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, "build", str(model_dir), "--heads", str(heads_dir),
                             "--tree", artifact_tree_file(tiny_dirs), "--max-seq", "64", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = _lines(proc.stdout)
        while (line := lines.get(timeout=300)) is not None and "export medusa graph" not in line:
            pass
        assert line is not None, "the build ended before exporting"
        assert [p.name for p in tmp_path.glob("art.partial-*")], "the build writes into art.partial-*"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    assert proc.stderr.read().strip().splitlines()[-1] == "terminated"
    assert sorted(os.listdir(tmp_path)) == []  # neither art nor art.partial-*


def test_ctrl_c_before_a_command_runs_says_interrupted(monkeypatch, capsys):
    """A Ctrl-C while the commands' modules import (before click's own handling) exits 130 in one line."""
    import pytest

    from medusa_export.runtime.cli import app

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(app, "_register", interrupted)
    with pytest.raises(SystemExit) as exit_:
        app.main()
    assert exit_.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_ctrl_c_while_onnxruntime_starts_is_an_interrupt_not_a_missing_package(monkeypatch):
    """onnxruntime's native start-up turns a Ctrl-C into ImportError('initialization failed'): that is the user's
    interrupt, not "onnxruntime is not installed"; any other failing import is named as such."""
    import builtins

    import pytest

    from medusa_export.runtime.backends import ort
    from medusa_export.runtime.errors import BackendUnavailableError

    real_import = builtins.__import__

    def failing_import(failure):
        def imp(name, *args, **kwargs):
            if name == "onnxruntime":
                raise failure()
            return real_import(name, *args, **kwargs)
        return imp

    def interrupted_start():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ImportError("initialization failed")  # __context__: the KeyboardInterrupt

    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    monkeypatch.setattr(builtins, "__import__", failing_import(interrupted_start))
    with pytest.raises(KeyboardInterrupt):
        ort._import_ort()
    monkeypatch.setattr(builtins, "__import__", failing_import(lambda: ImportError("libonnxruntime.so: bad ELF")))
    with pytest.raises(BackendUnavailableError, match=r"installed but cannot be imported \(libonnxruntime.so: bad ELF\)"):
        ort._import_ort()
    monkeypatch.setattr(builtins, "__import__",
                        failing_import(lambda: ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime")))
    with pytest.raises(BackendUnavailableError, match="^onnxruntime is not installed"):
        ort._import_ort()
