"""The CLI and library where the machine or the environment gets in the way: a full disk, a memory limit, a KV
cache larger than the free memory, a misplaced MEDUSA_EXPORT_CACHE: each one line or a typed error, never a
traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import assert_one_line_error, cli


@pytest.mark.parametrize("error, words", [
    (OSError(28, "No space left on device"), "No space left on device"),  # onnx.save_model on a full disk
    (OSError(12, "Cannot allocate memory"), "Cannot allocate memory"),
    (MemoryError(), "out of memory"),
])
def test_a_machine_out_of_disk_or_memory_is_one_line_not_a_traceback(error, words, capsys):
    """A full disk while a library wrote through its own file object (no file name in the error), or a memory
    limit, ended in a traceback."""
    import click
    import typer

    from medusa_export.runtime.cli.app import cli_errors

    def command():
        raise error

    with pytest.raises((typer.Exit, click.exceptions.Exit)) as e:
        cli_errors(command)()
    assert e.value.exit_code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and words in err


def test_a_kv_cache_beyond_a_memory_limit_is_a_typed_error(monkeypatch):
    import mmap

    from medusa_export.runtime.backends import slot_cache
    from medusa_export.runtime.errors import BackendUnavailableError

    def refuse(*_a, **_k):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", refuse)
    with pytest.raises(BackendUnavailableError, match="cannot reserve 4 MiB for a KV cache"):
        slot_cache.small_page_zeros((1024, 1024), "float32")


def test_a_torch_kv_cache_larger_than_the_free_memory_is_refused_before_it_is_zeroed(tiny, monkeypatch):
    """torch zeroes a KV buffer at once: past the machine's memory the out-of-memory killer ended the process."""
    from medusa_export.exporter import torch_backend
    from medusa_export.runtime.errors import BackendUnavailableError

    backend = tiny.backend(max_seq=64)
    with backend.new_session():  # fits
        pass
    monkeypatch.setattr(torch_backend, "available_ram", lambda: 1000)
    with pytest.raises(BackendUnavailableError, match=r"a KV cache of 64 tokens takes \d+ MiB but 0 MiB are free "
                                                      r"on cpu: lower --max-seq"):
        backend.new_session()


def test_an_empty_or_misplaced_cache_variable(tmp_path, monkeypatch):
    """Empty, it wrote 517 MB of the built-in model into the current directory; naming a file, the error named
    neither the variable nor a fix."""
    from medusa_export.runtime.cache_dir import cache_root
    from medusa_export.runtime.errors import InputError

    monkeypatch.setenv("MEDUSA_EXPORT_CACHE", "")
    assert cache_root() == Path.home() / ".cache" / "medusa-export"
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("MEDUSA_EXPORT_CACHE", str(tmp_path / "afile"))
    with pytest.raises(InputError, match="MEDUSA_EXPORT_CACHE=.*afile' is not a directory"):
        cache_root()
    monkeypatch.setenv("MEDUSA_EXPORT_CACHE", str(tmp_path / "new"))
    assert cache_root() == tmp_path / "new"
    monkeypatch.setenv("MEDUSA_EXPORT_CACHE", str(tmp_path / "new" / "deeper"))
    assert cache_root() == tmp_path / "new" / "deeper"  # made when first written
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MEDUSA_EXPORT_CACHE", "~/c")  # a Dockerfile's ENV keeps the ~: not a folder named "~"
    assert cache_root() == tmp_path / "c"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDUSA_EXPORT_CACHE", "rel")  # relative: fixed where it was read, not moving with the cwd
    assert cache_root() == tmp_path / "rel" and cache_root().is_absolute()


def test_a_cache_variable_under_a_file_is_named_before_any_command_starts(tmp_path):
    """`MEDUSA_EXPORT_CACHE=/etc/hosts/c medusa-export generate -p hi` dequantized the built-in model, then failed
    with "Not a directory: /etc/hosts/c/models/....tmp", naming neither the variable nor a fix."""
    (tmp_path / "afile").write_text("x")
    proc = cli("generate", "--prompt", "hi", "--max-new-tokens", "2",
               env={"MEDUSA_EXPORT_CACHE": str(tmp_path / "afile" / "cache" / "x")})
    assert_one_line_error(proc, "MEDUSA_EXPORT_CACHE=", "lies under", "afile, a file", "unset it")


def test_a_misplaced_cache_variable_is_named_before_any_command_starts(tmp_path):
    """It was read only after the model had loaded (or the distillation had run)."""
    (tmp_path / "afile").write_text("x")
    proc = cli("generate", "--prompt", "hi", "--max-new-tokens", "2", env={"MEDUSA_EXPORT_CACHE": str(tmp_path / "afile")})
    assert_one_line_error(proc, "MEDUSA_EXPORT_CACHE=", "is not a directory")


@pytest.mark.parametrize("encoding, errors, shown", [("latin-1", "strict", b"caf\xe9 ?"),
                                                     ("latin-1", "backslashreplace", b"caf\xe9 \\u30d0"),
                                                     ("utf-8", "strict", "café バ".encode())])
def test_an_answer_the_terminals_encoding_cannot_hold_is_shown_not_a_traceback(monkeypatch, encoding, errors, shown):
    """`generate` printing a Japanese answer (through typer.echo) to a latin-1 terminal ended with a
    UnicodeEncodeError traceback, exit 1. Such characters now show as '?'; a handler the user chose and a UTF-8
    output are left as they are."""
    import io
    import sys

    import typer

    from medusa_export.runtime.cli.app import _tolerant_stdout

    buffer = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(buffer, encoding=encoding, errors=errors))
    _tolerant_stdout()
    typer.echo("café バ", nl=False)
    sys.stdout.flush()
    assert buffer.getvalue() == shown


def test_the_command_makes_its_output_tolerant_before_any_command_runs():
    import os
    import subprocess
    import sys

    code = ("import sys\nfrom medusa_export.runtime.cli.app import main\nsys.argv = ['medusa-export', '--version']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nsys.stderr.write(sys.stdout.errors)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONIOENCODING": "latin-1"})
    assert proc.stderr.strip().endswith("replace"), proc.stderr
