"""Where this machine's models live (`exporter/model_loading.remember_location`): an artifact built from a model
directory finds it again by fingerprint. Several processes noting models at once (two builds, parallel test workers)
keep every entry."""

from __future__ import annotations

import json
import subprocess
import sys

NOTES = 300  # per process: enough for their read-change-write cycles to overlap

# Each process waits for the other before noting (import times differ), then notes NOTES fingerprints of its own
_NOTE = """
import sys, time
from pathlib import Path
from medusa_export.exporter.model_loading import remember_location
tag, where, count = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
(where / f"ready-{tag}").touch()
deadline = time.monotonic() + 60
while len(list(where.glob("ready-*"))) < 2 and time.monotonic() < deadline:
    time.sleep(0.005)
for i in range(count):
    remember_location(f"{tag}{i:04d}", where)
"""


def test_processes_noting_models_at_once_keep_every_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSA_EXPORT_CACHE", str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", _NOTE, tag, str(tmp_path), str(NOTES)]) for tag in ("a", "b")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    known = json.loads((tmp_path / "cache" / "models" / "locations.json").read_text())
    assert len(known) == 2 * NOTES and set(known.values()) == {str(tmp_path)}
