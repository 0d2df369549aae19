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
