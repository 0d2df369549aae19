"""The attention kernel (`row_attention.c`): an ONNX Runtime custom-op library, compiled on this machine at first
use and cached.

    path = library_path()                          # compiles once per source and compiler, then reuses the file
    opts.register_custom_ops_library(path)         # before opening a graph built with --attention kernel

Artifacts built with ``--attention kernel`` run their attention in it (docs/graphs.md, "The attention kernel").
It needs a CPU with AVX2, FMA and F16C, and a C compiler (``$CC``, else ``cc`` or ``gcc``) the first time; without them
loading such an artifact fails in one line. The library goes to ``$MEDUSA_EXPORT_KERNEL_DIR``, else
``$MEDUSA_EXPORT_CACHE/kernels`` (``~/.cache/medusa-export/kernels``), named by a hash of the sources and flags and
one of the compiler (its command and version), so an edited source or another compiler builds a new file and never
reuses a stale one. It is built for any x86-64 CPU with AVX2 (the AVX-512 and AMX paths are chosen when it loads),
whatever ``$CC`` adds (``-march=native``, ``-ffast-math``), so a cache shared with another machine never holds code
this CPU lacks. A machine without a compiler, or a user who cannot write the directory, uses a library compiled from
the same source into that directory before (say, by root while a container image was built: the files are readable by
all, as the umask allows); the library is never taken from an artifact, which would make loading one run its code.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from ..artifact_files import sha256_file
from ..cache_dir import cache_root
from ..errors import BackendUnavailableError, first_line
from ..machine import machine_info
from ..whole_file import readable_as_made

SOURCE = Path(__file__).with_name("row_attention.c")
# compiled in SOURCE (#include): every other C file here, so a new one is in the cache key without a list to keep
INCLUDED = sorted(p for p in Path(__file__).parent.iterdir() if p.suffix in (".c", ".h") and p.name != SOURCE.name)
DOMAIN = "medusa_export"  # the custom ops' domain in the graphs
OP = "RowAttention"  # one sequence
LANES_OP = "LanesAttention"  # the sequences of a batched step, in one call
KV16_SUFFIX = "16"  # RowAttention16, LanesAttention16: the same ops over fp16 K/V caches
QUANTIZE_OP, SCALE_OP = "RowQuantize", "ScaleRows"  # int8 matmuls on activations quantized per row
BLOCK_OP = "BlockMatMul16"  # int8 weights in blocks of 32 times int16 activations per row (`block_matmul.c`)
BLOCK4_OP = "BlockMatMul16Q4"  # the same for 4-bit blocks d (q - 8) + offset (a Q4_0 / Q4_1 GGUF's, kept as they are)
BLOCK_F32_OP = "BlockMatMulF32Q4"  # fp32 rows times 4-bit blocks holding the model's fp32 weights exactly (block_f32.c)
SCREEN_OP = "ScreenedVocab"  # an fp32 lm_head's top words through an int8 product and exact candidates
# -ffp-contract=off: no multiply-add the source does not write, so every path computes a row alike.
# PORTABLE comes after $CC's words and undoes what they may add (-march=native: AVX-512 in the AVX2 code, a SIGILL on
# an AVX2 machine sharing the cache; -ffast-math: sums reordered), so every compiler command writes the same code.
PORTABLE = ["-march=x86-64", "-mtune=generic", "-mno-avx512f", "-fno-fast-math"]
FLAGS = ["-O3", *PORTABLE, "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fPIC", "-shared", "-fvisibility=hidden",
         "-std=c11"]
LIBS = ["-lm", "-pthread"]  # pthread: ScreenedVocab's per-thread scratch
NEEDS = ("avx2", "fma", "f16c")
SHARED_LIBRARY_MAGIC = b"\x7fELF"  # the kernel is built for x86-64 Linux
VERSION_TIMEOUT_S, COMPILE_TIMEOUT_S = 60, 300  # a compiler that hangs is stopped (its whole process group)
STALE_TMP_S = 3600  # a temporary file this old was left by a compile that was killed: removed by the next compile
SHOWN = 120  # characters of a path a message shows
_lock = threading.Lock()
_built: dict[str, str] = {}  # by source-and-compiler key: the library's path
_versions: dict[str, str] = {}  # by compiler command: its --version output


def row_op(half: bool) -> str:
    """The one-sequence attention op for fp32 (``half`` False) or fp16 caches."""
    return OP + KV16_SUFFIX if half else OP


def lanes_op(half: bool) -> str:
    """The batched-step attention op for fp32 or fp16 caches."""
    return LANES_OP + KV16_SUFFIX if half else LANES_OP


# ONNX Runtime's uint8 x int8 MatMulInteger on x86 CPUs without VNNI (AVX2, AVX-512 before VNNI) adds pairs of
# products in 16 bits with saturation, so a large row times large weights comes out clipped; with this entry it
# multiplies as uint8 x uint8 there instead, exactly. It is set only there: ONNX Runtime also rewrites the weights on
# CPUs with VNNI or AMX, whose uint8 x int8 sums are exact already, and its uint8 x uint8 kernels cost 1.3x (one row),
# 2.7x (8 rows) and 5.9x (64 rows) theirs on an AMX machine (a 576 x 3,072 product, scripts/exact_int8_micro.py).
EXACT_INT8_PRODUCTS = ("session.x64quantprecision", "1")
EXACT_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # x86 CPUs whose uint8 x int8 products never clip


class KernelDirUnwritable(BackendUnavailableError):
    """The kernel directory cannot take a new library (not writable, not a directory, full)."""


def register(opts, attention: str) -> None:
    """Make the kernel's op known to sessions opened with ``opts`` when the graphs use it (``attention`` "kernel"),
    and their int8 products (the row ops' MatMulInteger) exact where the CPU would clip them."""
    if attention == "kernel":
        path = library_path()
        try:
            opts.register_custom_ops_library(path)
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's Fail / RuntimeError: not a loadable library
            why = " ".join(str(e).replace(path, "it").split())[-160:]  # the end holds the loader's reason
            raise BackendUnavailableError(f"ONNX Runtime cannot load the attention kernel {_shown(path)} ({why}): "
                                          f"delete it to have it compiled again, or set MEDUSA_EXPORT_KERNEL_DIR to "
                                          f"another directory") from None
        if clipping_int8_products():
            opts.add_session_config_entry(*EXACT_INT8_PRODUCTS)


def clipping_int8_products() -> bool:
    """Whether ONNX Runtime's uint8 x int8 products clip on this CPU (x86 without VNNI or AMX)."""
    info = machine_info()
    x86 = any(f in info["flags"] for f in ("sse2", "avx2"))
    return x86 and not any(f in info["flags"] for f in EXACT_INT8_FLAGS)


def kernel_dir() -> Path:
    """``$MEDUSA_EXPORT_KERNEL_DIR`` (blank: unset, not a directory named by spaces), else ``kernels`` in the
    project's cache (``$MEDUSA_EXPORT_CACHE``, default ``~/.cache/medusa-export``, as for the built-in model); made
    absolute (``~`` expanded): a bare name such as ``row_attention-….so`` in ``.`` would send the loader searching
    the system's library directories, and a relative one would break when the process changes directory."""
    value = os.environ.get("MEDUSA_EXPORT_KERNEL_DIR", "")
    return Path(os.path.abspath(os.path.expanduser(value if value.strip() else cache_root() / "kernels")))


def _shown(path: Path | str) -> str:
    """``path`` for a one-line message: at most SHOWN characters (its end, which names the file)."""
    text = str(path)
    return text if len(text) <= SHOWN else "…" + text[-SHOWN:]


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``command`` with its output captured and no input; past ``timeout`` (TimeoutExpired) or on Ctrl-C its whole
    process group is killed: in a session of its own the terminal's Ctrl-C misses it, and a driver's cc1 would go
    on."""
    with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, errors="replace", start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:  # gone already
                pass
            proc.wait()
            raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _compiler() -> list[str]:
    """The compiler command (``$CC`` may carry words, e.g. ``ccache gcc``)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise BackendUnavailableError("the attention kernel needs a C compiler and none was found: install gcc (or "
                                      "set CC), or use an artifact built with --attention gqa")
    try:
        words = shlex.split(cc)
    except ValueError as e:  # an unclosed quote
        raise BackendUnavailableError(f"CC={cc!r:.80} cannot be read as a command ({e}): set CC to a compiler, "
                                      f"e.g. gcc") from None
    if not words:
        raise BackendUnavailableError("CC is blank: set CC to a compiler, e.g. gcc, or unset it")
    return words


def _compiler_version(cc: list[str]) -> str:
    key = " ".join(cc)
    if key not in _versions:  # once per process and compiler
        try:
            done = _run([*cc, "--version"], VERSION_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise BackendUnavailableError(f"the C compiler {key[:80]!r} did not answer --version in "
                                          f"{VERSION_TIMEOUT_S} s: install gcc or set CC to a C compiler") from None
        except (OSError, subprocess.SubprocessError) as e:
            raise BackendUnavailableError(f"the C compiler {key[:80]!r} does not run ({first_line(e, 160)}): install "
                                          f"gcc or set CC") from None
        _versions[key] = done.stdout + done.stderr  # some compilers answer on stderr
    return _versions[key]


def _compiler_key(cc: list[str]) -> str:
    """Eight hex digits naming the compiler: its version text and the whole command (``$CC``'s words may change the
    code, e.g. a -D that PORTABLE cannot undo)."""
    return hashlib.sha256((_compiler_version(cc) + "\0" + " ".join(cc)).encode()).hexdigest()[:8]


def _compiled_before(directory: Path, source: str) -> Path | None:
    """An intact library compiled from this source into ``directory`` by any compiler (None: none, or the directory
    cannot be listed)."""
    try:
        earlier = [p for p in sorted(directory.glob(f"row_attention-{source}-*.so")) if _intact(p)]
    except OSError:  # a name too long, a directory that cannot be read
        return None
    return earlier[-1] if earlier else None


def library_path() -> str:
    """The compiled library's path, building it first if this source and compiler have none yet. Without a
    compiler, or where the directory cannot be written, a library compiled from this source before into the same
    directory (by any compiler) is used."""
    missing = [f for f in NEEDS if f not in machine_info()["flags"]]
    if missing:
        raise BackendUnavailableError(f"the attention kernel needs a CPU with {' and '.join(NEEDS)} ({', '.join(missing)} "
                                      f"missing here): use an artifact built with --attention gqa")
    code = b"".join(p.read_bytes() for p in [SOURCE, *INCLUDED])
    source = hashlib.sha256(code + " ".join(FLAGS + LIBS).encode()).hexdigest()[:16]
    directory = kernel_dir()
    try:
        cc = _compiler()
        key = f"{source}-{_compiler_key(cc)}"
    except BackendUnavailableError:
        earlier = _compiled_before(directory, source)
        if earlier is not None:  # e.g. compiled when an image was built
            return str(earlier)
        raise
    with _lock:
        if key in _built:
            return _built[key]
        path = directory / f"row_attention-{key}.so"
        if not _intact(path):  # absent, or not the file compiled here (truncated, replaced): mapping it may crash
            try:
                _compile(cc, directory, path)
            except KernelDirUnwritable:
                # an image's cache, compiled by another user or compiler (a compile that fails is said, not hidden)
                earlier = _compiled_before(directory, source)
                if earlier is None:
                    raise
                path = earlier
        _built[key] = str(path)
        return _built[key]


def _path_report(symbol: str) -> int:
    """What the library's exported function ``symbol`` (a kernel path's report) returns in this process."""
    import ctypes

    return getattr(ctypes.CDLL(library_path()), symbol)()


def block_matmul_path() -> str:
    """The path BlockMatMul16 / BlockMatMul16Q4 take in this process: "amx" (AMX tiles for steps of 16 rows or more,
    AVX-512 VNNI below), "avx512" or "avx2" (`MEDUSA_EXPORT_KERNEL_NO_AMX`, `MEDUSA_EXPORT_KERNEL_AVX2` steer it)."""
    return ("avx2", "avx512", "amx")[_path_report("medusa_export_block_path")]


def block_f32_path() -> str:
    """The path BlockMatMulF32Q4 takes in this process: "avx512" or "avx2" (`MEDUSA_EXPORT_KERNEL_AVX2`)."""
    return ("avx2", "avx512")[_path_report("medusa_export_block_f32_path")]


def _digest_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _intact(library: Path) -> bool:
    """Whether ``library`` is the file a compile here wrote: its sha256 beside it, written after it. A truncated
    or replaced library would crash the process when mapped (SIGBUS), not fail with a message."""
    try:
        return _digest_path(library).read_text().strip() == sha256_file(library)
    except (OSError, UnicodeDecodeError):
        return False


def _compile(cc: list[str], directory: Path, path: Path) -> None:
    """Into a unique temporary name beside ``path``, then renamed: another process sees no file or a whole one."""
    tmp = _temporary(directory, f".{path.name}.")
    try:
        library = _build(cc, tmp)
        # mkstemp's 0600 would keep the library from every other user: a cache filled while a container image
        # is built, by root, is read at run time by the service's own user. The umask decides, as for any new file.
        readable_as_made(tmp, executable=True)
        os.replace(tmp, path)
        digest = _digest_path(path)
        digest_tmp = _temporary(directory, f".{digest.name}.")  # unique: two processes may compile at once
        try:
            digest_tmp.write_text(hashlib.sha256(library).hexdigest() + "\n")
            readable_as_made(digest_tmp)
            os.replace(digest_tmp, digest)
        finally:
            digest_tmp.unlink(missing_ok=True)
    except OSError as e:
        raise KernelDirUnwritable(f"cannot write the attention kernel to {_shown(directory)} "
                                  f"({e.strerror or first_line(e, 80)}): free space there or set "
                                  f"MEDUSA_EXPORT_KERNEL_DIR to a writable directory") from None
    finally:
        tmp.unlink(missing_ok=True)


def _temporary(directory: Path, prefix: str) -> Path:
    """A new empty file in ``directory`` (made if missing) named ``prefix``…``.tmp``, after removing those a killed
    compile left there over STALE_TMP_S ago; a BackendUnavailableError when the directory cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob(f"{glob.escape(prefix)}*.tmp"):
            try:
                if time.time() - old.stat().st_mtime > STALE_TMP_S:
                    old.unlink()
            except OSError:  # another process removed it first
                pass
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
        os.close(fd)
    except OSError as e:
        file = e.errno in (errno.EEXIST, errno.ENOTDIR)  # a file where a directory should be
        what = "is not a directory" if file else f"cannot be written ({e.strerror or first_line(e, 80)})"
        raise KernelDirUnwritable(f"the kernel directory {_shown(directory)} {what}: set "
                                  f"MEDUSA_EXPORT_KERNEL_DIR to a writable directory") from None
    return Path(name)


def _build(cc: list[str], out: Path) -> bytes:
    """Compile the library into ``out`` and return its bytes: once more without the AMX path (which needs a recent
    assembler) if the first compile fails; a BackendUnavailableError naming the compiler's first error."""
    name = " ".join(cc)[:80]
    try:
        for extra in ([], ["-DMEDUSA_EXPORT_NO_AMX"]):
            done = _run([*cc, *FLAGS, *extra, "-o", str(out), str(SOURCE), *LIBS], COMPILE_TIMEOUT_S)
            if done.returncode == 0:
                break
    except subprocess.TimeoutExpired:
        raise BackendUnavailableError(f"compiling the attention kernel with {name} took over {COMPILE_TIMEOUT_S} s: "
                                      f"check the compiler, or set CC to another") from None
    except OSError as e:  # the compiler went away since it answered --version
        raise BackendUnavailableError(f"the C compiler {name!r} does not run ({first_line(e, 160)}): install gcc or "
                                      f"set CC") from None
    if done.returncode != 0:
        raise BackendUnavailableError(f"compiling the attention kernel with {name} failed "
                                      f"({_first_error(done.stderr)}): install gcc >= 9 or use an artifact built "
                                      f"with --attention gqa")
    library = out.read_bytes()
    if not library.startswith(SHARED_LIBRARY_MAGIC):  # a "compiler" that exits 0 without writing one
        raise BackendUnavailableError(f"{name} exited without writing a shared library: set CC to a C compiler "
                                      f"such as gcc")
    return library


def _first_error(stderr: str) -> str:
    """The compiler's first line naming an error (its first line when none does), at most 200 characters."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return ((errors or lines or ["no message"])[0])[:200]
