"""The kernel library's compile cache (`runtime/kernels`): compiled once per source and compiler, reused without a
compiler, never mapped when damaged, and every way a compiler or a library can fail is a one-line
BackendUnavailableError."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from medusa_export.runtime import kernels
from medusa_export.runtime.errors import BackendUnavailableError
from conftest import seed_kernel_library

if [f for f in kernels.NEEDS if f not in kernels.machine_info()["flags"]]:
    pytest.skip("the attention kernel needs AVX2, FMA and F16C", allow_module_level=True)


def test_the_library_is_compiled_once_per_source_and_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSA_EXPORT_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_built", {})
    path = kernels.library_path()
    name = path.split("/")[-1]
    assert path.startswith(str(tmp_path)) and sorted(p.name for p in tmp_path.iterdir()) == [name, name + ".sha256"]
    stamp = (tmp_path / path.split("/")[-1]).stat().st_mtime_ns
    monkeypatch.setattr(kernels, "_built", {})  # a new process: the file is reused, not compiled again
    assert kernels.library_path() == path and (tmp_path / path.split("/")[-1]).stat().st_mtime_ns == stamp


def test_without_a_compiler_a_library_compiled_before_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSA_EXPORT_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_built", {})
    path = str(seed_kernel_library(tmp_path))  # compiled before, as an image build step would
    assert kernels.library_path() == path
    monkeypatch.setattr(kernels, "_built", {})
    monkeypatch.setattr(kernels, "_versions", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert kernels.library_path() == path
    monkeypatch.setattr(kernels, "SOURCE", tmp_path / "edited.c")  # another source: nothing to reuse
    (tmp_path / "edited.c").write_text("/* edited */\n")
    with pytest.raises(BackendUnavailableError, match="does not run"):
        kernels.library_path()


def test_no_compiler_or_a_failing_one_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSA_EXPORT_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_built", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(BackendUnavailableError, match="does not run"):
        kernels.library_path()
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'fake 1.0'\n[ \"$1\" = --version ] && exit 0\necho 'cc: fatal error' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.raises(BackendUnavailableError, match="compiling the attention kernel .* failed") as e:
        kernels.library_path()
    assert "\n" not in str(e.value) and [p.name for p in tmp_path.iterdir()] == ["cc"]  # no half-written library


def test_a_compiler_that_cannot_build_the_amx_path_builds_the_library_without_it(tmp_path, monkeypatch):
    """The AMX path needs a recent assembler: when the first compile fails, a second one without it
    (-DMEDUSA_EXPORT_NO_AMX) gives a library whose block products take the VNNI or AVX2 path."""
    import shutil

    gcc = shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        pytest.skip("no C compiler here")
    log = tmp_path / "calls"
    fake = tmp_path / "cc"
    fake.write_text(f"#!/bin/sh\necho \"$*\" >> {log}\ncase \"$*\" in *MEDUSA_EXPORT_NO_AMX*) ;; --version) ;; "
                    f"*) echo 'Error: no such instruction: ldtilecfg' >&2; exit 1;; esac\nexec {gcc} \"$@\"\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("MEDUSA_EXPORT_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.setattr(kernels, "_built", {})
    monkeypatch.setattr(kernels, "_versions", {})
    kernels.library_path()
    compiles = [line for line in log.read_text().splitlines() if "--version" not in line]
    assert len(compiles) == 2 and "MEDUSA_EXPORT_NO_AMX" in compiles[1] and "MEDUSA_EXPORT_NO_AMX" not in compiles[0]
    assert kernels.block_matmul_path() in ("avx512", "avx2")


def test_a_damaged_cached_library_is_compiled_again_not_mapped(tmp_path, monkeypatch):
    """A truncated library in the cache (a copy cut short) would crash the process when mapped (SIGBUS): its
    recorded sha256 no longer matches, so it is compiled again."""
    monkeypatch.setenv("MEDUSA_EXPORT_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_built", {})
    path = seed_kernel_library(tmp_path)
    assert kernels.library_path() == str(path)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 3])
    monkeypatch.setattr(kernels, "_built", {})
    assert kernels.library_path() == str(path) and path.read_bytes() == whole
    path.write_bytes(whole[:100])  # and without a compiler, a damaged library is not used
    monkeypatch.setattr(kernels, "_built", {})
    monkeypatch.setattr(kernels, "_versions", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(BackendUnavailableError, match="does not run"):
        kernels.library_path()


@pytest.mark.parametrize("cc, words", [('gcc "', "cannot be read as a command"), ("  ", "CC is blank"),
                                       ("true", "without writing a shared library")])
def test_a_cc_that_is_no_compiler_is_a_one_line_error(tmp_path, monkeypatch, cc, words):
    monkeypatch.setenv("MEDUSA_EXPORT_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_built", {})
    monkeypatch.setattr(kernels, "_versions", {})
    monkeypatch.setenv("CC", cc)
    with pytest.raises(BackendUnavailableError, match=words) as e:
        kernels.library_path()
    assert "\n" not in str(e.value) and not list(tmp_path.glob("*.so"))  # nothing cached for the next load


def test_a_library_onnx_runtime_cannot_load_is_a_one_line_error(tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    bogus = tmp_path / "bogus.so"
    bogus.write_bytes(b"\x7fELF" + b"\0" * 60)
    monkeypatch.setattr(kernels, "library_path", lambda: str(bogus))
    with pytest.raises(BackendUnavailableError, match="ONNX Runtime cannot load the attention kernel"):
        kernels.register(ort.SessionOptions(), "kernel")


@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_kernel_dir_means_the_cache(monkeypatch, tmp_path, blank):
    """A blank MEDUSA_EXPORT_KERNEL_DIR is unset (as MEDUSA_EXPORT_CACHE), not a directory named by spaces."""
    monkeypatch.setenv("MEDUSA_EXPORT_KERNEL_DIR", blank)
    monkeypatch.setenv("MEDUSA_EXPORT_CACHE", str(tmp_path))
    assert kernels.kernel_dir() == tmp_path / "kernels"


def _copying_cc(tmp_path: Path, library: Path) -> str:
    """A "compiler" of another version that writes ``library``'s bytes to its -o file (no 9 s compile)."""
    fake = tmp_path / "other-cc"
    fake.write_text(f"#!/bin/sh\n[ \"$1\" = --version ] && echo 'other-cc 9.9' && exit 0\n"
                    f"while [ \"$1\" != -o ]; do shift; done\ncat {library} > \"$2\"\n")
    fake.chmod(0o755)
    return str(fake)


@pytest.mark.parametrize("umask, library_mode, digest_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_a_compiled_library_is_readable_by_other_users_as_the_umask_allows(tmp_path, monkeypatch, umask,
                                                                           library_mode, digest_mode):
    """mkstemp's 0600 kept a library compiled by root (a container image's build) from the service's own user,
    which then could neither check nor map it."""
    seeded = seed_kernel_library(tmp_path / "seed")
    monkeypatch.setenv("MEDUSA_EXPORT_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.setattr(kernels, "_built", {})
    monkeypatch.setattr(kernels, "_versions", {})
    monkeypatch.setenv("CC", _copying_cc(tmp_path, seeded))
    before = os.umask(umask)
    try:
        path = Path(kernels.library_path())
    finally:
        os.umask(before)
    assert path.parent == tmp_path / "kernels" and path.read_bytes() == seeded.read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == library_mode
    assert stat.S_IMODE(kernels._digest_path(path).stat().st_mode) == digest_mode


def test_a_directory_this_user_cannot_write_serves_a_library_compiled_there_before(tmp_path, monkeypatch):
    """An image's cache, compiled by root with its gcc, read by a user whose compiler differs (another key) and who
    cannot write there: the library from the same source is used, as without a compiler; with none, the error. A
    compile that fails in a writable directory is an error even beside such a library (a broken $CC is said)."""
    seeded = seed_kernel_library(tmp_path / "kernels")
    monkeypatch.setenv("MEDUSA_EXPORT_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.setattr(kernels, "_built", {})
    monkeypatch.setattr(kernels, "_versions", {})
    monkeypatch.setenv("CC", _copying_cc(tmp_path, seeded))

    def read_only(directory, prefix):  # what _temporary raises for a directory this user cannot write
        raise kernels.KernelDirUnwritable(f"the kernel directory {directory} cannot be written (Permission denied)")

    monkeypatch.setattr(kernels, "_temporary", read_only)
    assert kernels.library_path() == str(seeded)
    assert sorted(p.name for p in seeded.parent.iterdir()) == [seeded.name, seeded.name + ".sha256"]
    monkeypatch.setattr(kernels, "_built", {})
    monkeypatch.undo()  # a writable directory whose compile fails: the failure is said, not hidden behind the library
    monkeypatch.setenv("MEDUSA_EXPORT_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.setattr(kernels, "_built", {})
    monkeypatch.setattr(kernels, "_versions", {})
    failing = tmp_path / "failing-cc"
    failing.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'failing-cc 1.0' && exit 0\necho 'error: no' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    with pytest.raises(BackendUnavailableError, match="compiling the attention kernel .* failed"):
        kernels.library_path()
    monkeypatch.setattr(kernels, "_temporary", read_only)  # unwritable and nothing compiled there: the error
    monkeypatch.setattr(kernels, "_built", {})
    seeded.unlink()
    with pytest.raises(BackendUnavailableError, match="cannot be written"):
        kernels.library_path()
