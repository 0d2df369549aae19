"""The lock `train-heads` holds on its --out while it runs: re-entrant, left behind by a killed run without
blocking the next, and held exactly as long as its process lives (the one `output_dir.try_lock` build uses too)."""

from __future__ import annotations

import shutil
import subprocess
import sys

from medusa_export.exporter.train_out_dir import TRAIN_LOCK, check_train_out_dir, train_out_lock


def test_the_lock_keeps_an_existing_out_and_a_killed_runs_lock_file_is_ours(tiny_dirs, tmp_path):
    out = tmp_path / "heads"
    shutil.copytree(tiny_dirs[1], out)
    with train_out_lock(out):
        with train_out_lock(out):  # re-entrant: the CLI's and train_medusa2's
            pass
        assert (out / TRAIN_LOCK).exists()
    assert not (out / TRAIN_LOCK).exists() and (out / "config.json").exists()
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / TRAIN_LOCK).touch()
    (killed / "checkpoint.pt").write_bytes(b"state")
    check_train_out_dir(killed, "medusa1")
    (killed / "checkpoint.pt").unlink()
    check_train_out_dir(killed, "medusa2")  # as good as empty


def test_the_shared_lock_is_held_by_a_live_process_and_freed_when_it_dies(tmp_path):
    """One helper (`output_dir.try_lock`) now decides for build's work directories and train-heads' --out lock."""
    import os

    from medusa_export.exporter import output_dir, train_out_dir

    mark = tmp_path / "mark"
    mark.touch()
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time\n"
                               "from medusa_export.exporter.output_dir import try_lock\n"
                               f"fd = os.open({str(mark)!r}, os.O_RDWR)\n"
                               "assert try_lock(fd)\nprint('held', flush=True)\ntime.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        fd = os.open(mark, os.O_RDWR)
        try:
            assert not output_dir.try_lock(fd) and not train_out_dir.try_lock(fd)
            holder.kill()
            holder.wait()
            assert output_dir.try_lock(fd)  # a killed holder's lock is gone
        finally:
            os.close(fd)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
