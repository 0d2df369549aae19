"""The kernel library's cache against what users' machines hold (`runtime/kernels`): a $CC that adds CPU or math
flags, a cache shared by processes compiling at once, relative, long and non-ASCII directories, compilers that hang
or bury their error under warnings, the path switches' values. Each failure is one typed line (the CLI: exit 2)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medusa_export.runtime import kernels
from medusa_export.runtime.errors import BackendUnavailableError
from conftest import seed_kernel_library

if [f for f in kernels.NEEDS if f not in kernels.machine_info()["flags"]]:
    pytest.skip("the attention kernel needs AVX2, FMA and F16C", allow_module_level=True)

GCC = shutil.which("gcc") or shutil.which("cc")
needs_gcc = pytest.mark.skipif(not GCC, reason="no C compiler here")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A kernel directory of this test's own and a process that has compiled nothing yet."""
    monkeypatch.setenv("MEDUSA_EXPORT_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.setattr(kernels, "_built", {})
    monkeypatch.setattr(kernels, "_versions", {})
    return tmp_path / "kernels"


def _fake_cc(path: Path, body: str) -> str:
    """A shell script standing in for the compiler; its path."""
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


@needs_gcc
def test_cc_flags_for_this_cpu_build_the_same_portable_library_under_another_name(fresh, monkeypatch):
    """CC="gcc -march=native -ffast-math" put AVX-512 into the AVX2 code under the file name plain gcc uses: a cache
    shared with an AVX2 machine then crashed it (SIGILL). The library is now the same bytes, named apart."""
    plain = seed_kernel_library(fresh)  # the compiler the environment names (or the one found on PATH)
    assert kernels.library_path() == str(plain)
    monkeypatch.setattr(kernels, "_built", {})
    monkeypatch.setenv("CC", f"{shlex.join(kernels._compiler())} -march=native -ffast-math")
    native = Path(kernels.library_path())
    assert native != plain and native.read_bytes() == plain.read_bytes()


def test_every_included_c_file_is_in_the_cache_key():
    """An edited file that row_attention.c includes must name a new library, never reuse the stale one."""
    hashed = {p.name for p in kernels.INCLUDED}
    for source in [kernels.SOURCE, *kernels.INCLUDED]:
        for name in re.findall(r'#include\s+"([^"]+)"', source.read_text()):
            assert name in hashed, (source.name, name)


def test_a_relative_or_home_kernel_dir_is_made_absolute(monkeypatch, tmp_path):
    """MEDUSA_EXPORT_KERNEL_DIR=. gave a bare file name, which the loader looked for in the system's directories."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEDUSA_EXPORT_KERNEL_DIR", ".")
    assert kernels.kernel_dir() == tmp_path
    monkeypatch.setenv("MEDUSA_EXPORT_KERNEL_DIR", "~/k")
    assert kernels.kernel_dir() == tmp_path / "home" / "k"


@needs_gcc
def test_a_library_in_the_current_directory_loads(fresh, monkeypatch, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    seed_kernel_library(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDUSA_EXPORT_KERNEL_DIR", ".")
    kernels.register(ort.SessionOptions(), "kernel")
    assert os.path.isabs(kernels.library_path())


@needs_gcc
def test_a_non_ascii_directory_with_spaces_holds_a_loadable_library(fresh, monkeypatch, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.setenv("MEDUSA_EXPORT_KERNEL_DIR", str(tmp_path / "ünï cødé ☃" / "k"))
    kernels.register(ort.SessionOptions(), "kernel")
    assert "☃" in kernels.library_path()


def test_a_path_too_long_is_a_short_one_line_error_with_or_without_a_compiler(fresh, monkeypatch, tmp_path):
    """Without a compiler, looking for an earlier library under a name too long raised a bare OSError."""
    monkeypatch.setenv("MEDUSA_EXPORT_KERNEL_DIR", str(tmp_path / "/".join(["d" * 200] * 25)))
    for cc in (str(tmp_path / "no-such-cc"), GCC or "gcc"):
        monkeypatch.setenv("CC", cc)
        with pytest.raises(BackendUnavailableError) as e:
            kernels.library_path()
        assert "\n" not in str(e.value) and len(str(e.value)) < 400


@needs_gcc
def test_a_file_named_as_the_kernel_dir_is_named_so(fresh, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("MEDUSA_EXPORT_KERNEL_DIR", str(tmp_path / "file"))
    with pytest.raises(BackendUnavailableError, match="is not a directory: set MEDUSA_EXPORT_KERNEL_DIR"):
        kernels.library_path()


def test_the_compilers_error_is_named_not_its_first_warning(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", _fake_cc(tmp_path / "cc", "[ \"$1\" = --version ] && echo 'fake 1' && exit 0\n"
                                      "echo 'x.c:1: warning: unused' >&2\necho 'x.c:2: error: no avx2 here' >&2\n"
                                      "exit 1\n"))
    with pytest.raises(BackendUnavailableError, match=r"failed \(x\.c:2: error: no avx2 here\)"):
        kernels.library_path()


def test_a_compiler_that_hangs_is_stopped_with_its_children(fresh, monkeypatch, tmp_path):
    """Past the limit the compiler's whole process group is killed: a driver's cc1 does not run on."""
    pid = tmp_path / "pid"
    monkeypatch.setenv("CC", _fake_cc(tmp_path / "cc", "[ \"$1\" = --version ] && echo 'fake 1' && exit 0\n"
                                      f"sleep 60 &\necho $! > {pid}\nwait\n"))
    monkeypatch.setattr(kernels, "COMPILE_TIMEOUT_S", 1)
    start = time.monotonic()
    with pytest.raises(BackendUnavailableError, match="took over 1 s"):
        kernels.library_path()
    assert time.monotonic() - start < 20
    child = int(pid.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and "Z" not in _state(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists() or "Z" in _state(child)
    assert not list(fresh.glob("*.tmp")) and not list(fresh.glob("*.so"))


def _state(pid: int) -> str:
    """A process's state letter ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


@needs_gcc
def test_temporary_files_a_killed_compile_left_are_removed(fresh):
    fresh.mkdir(parents=True)
    old, new = fresh / ".row_attention-x.so.old.tmp", fresh / ".row_attention-x.so.new.tmp"
    for f in (old, new):
        f.write_bytes(b"half")
    os.utime(old, (time.time() - 2 * kernels.STALE_TMP_S,) * 2)
    kernels._temporary(fresh, ".row_attention-x.so.").unlink()
    assert not old.exists() and new.exists()  # another process's compile in progress is left alone


@needs_gcc
def test_two_processes_compiling_into_one_directory_at_once_both_load_a_whole_library(fresh, tmp_path):
    code = ("import onnxruntime as ort; from medusa_export.runtime import kernels; "
            "kernels.register(ort.SessionOptions(), 'kernel'); print(kernels.library_path())")
    env = {**os.environ, "MEDUSA_EXPORT_KERNEL_DIR": str(fresh), "CC": GCC}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-400:] for o in outs]
    path = Path(outs[0][0].strip())
    assert outs[1][0].strip() == str(path) and kernels._intact(path)
    assert sorted(p.name for p in fresh.iterdir()) == [path.name, path.name + ".sha256"]


@needs_gcc
@pytest.mark.parametrize("value, avx2", [("1", True), ("0", False), ("", False), (" ", False)])
def test_the_avx2_switch_is_on_only_for_a_value_other_than_blank_or_zero(fresh, value, avx2):
    """MEDUSA_EXPORT_KERNEL_AVX2=0 took the AVX2 path (C's getenv saw a value)."""
    if "avx512f" not in kernels.machine_info()["flags"]:
        pytest.skip("the AVX2 path is the only one on this CPU")
    seed_kernel_library(fresh)  # compiled before, read by the child
    code = "from medusa_export.runtime import kernels; print(kernels.block_f32_path())"
    env = {**os.environ, "MEDUSA_EXPORT_KERNEL_DIR": str(fresh), "MEDUSA_EXPORT_KERNEL_AVX2": value}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.stdout.strip() == ("avx2" if avx2 else "avx512"), done.stderr[-400:]


def test_the_cli_names_a_kernel_dir_that_is_a_file_in_one_line(tmp_path):
    from test_cli import assert_one_line_error, cli

    (tmp_path / "file").write_text("x")
    proc = cli("build", "--out", str(tmp_path / "art"), "--attention", "kernel", "--corpus-drafts", "none",
               env={"MEDUSA_EXPORT_KERNEL_DIR": str(tmp_path / "file" / "k"), "CC": GCC or "gcc"})
    assert_one_line_error(proc, "MEDUSA_EXPORT_KERNEL_DIR")
