"""The GGUF cache's entry lock where the file system refuses locks: the entry is made unlocked (its docstring's
promise), never a traceback from flock."""

from __future__ import annotations

import pytest

fcntl = pytest.importorskip("fcntl")

from medusa_export.exporter.gguf_cache import entry_lock  # noqa: E402


def test_a_file_system_without_locks_goes_on_unlocked(tmp_path, monkeypatch):
    def refuse(fd, op):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    ran = []
    with entry_lock(tmp_path / "models" / "abc"):
        ran.append(1)
    assert ran == [1]


def test_a_killed_writers_temporary_folder_is_removed_under_the_lock_only(tmp_path, monkeypatch):
    """Each writer dequantizes into a folder of its own (a whole fp32 model): a killed one's stayed for ever. Under the
    lock no other process is writing, so they go; without a lock another writer's may be live, so they stay."""
    out = tmp_path / "models" / "abc"
    out.parent.mkdir(parents=True)
    left = out.with_name("abc.tmp-123-ff")
    (left / "x").parent.mkdir()
    (left / "x").write_text("half a model")
    other = out.with_name("abcd.tmp-1-aa")  # another entry's
    other.mkdir()
    with entry_lock(out) as locked:
        assert locked
    assert not left.exists() and other.exists()
    left.mkdir()
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(37, "No locks available")))
    with entry_lock(out) as locked:
        assert not locked
    assert left.exists()


def test_a_damaged_entry_that_cannot_be_moved_aside_is_a_one_line_error(tmp_path, monkeypatch):
    """Another user's damaged entry in a shared cache: moving it aside raised PermissionError as a traceback."""
    import os

    from medusa_export.exporter.gguf_cache import publish
    from medusa_export.runtime.errors import ModelError

    out, tmp = tmp_path / "abc", tmp_path / "abc.tmp-1-aa"
    (out / "x").parent.mkdir()
    (out / "x").write_text("damaged")
    tmp.mkdir()
    real = os.rename

    def rename(src, dst):
        if str(src) == str(out):
            raise PermissionError(13, "Permission denied")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(ModelError, match="cannot replace the damaged cache entry .*abc: delete it and run again"):
        publish(tmp, out)
    assert not tmp.exists() and (out / "x").exists()
