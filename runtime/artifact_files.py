"""Where an artifact's files are and whether they are intact: paths the manifest names, kept inside the artifact
(no absolute path, ``..``, NUL byte, or symlink leading out or in a loop; one plain form per name), each listed
file's size and sha256, and what a graph was built for (read from its tables' shapes, not its weights). Every
failure is an ArtifactError naming the file (`runtime.manifest` reads the manifest through these).

    path = artifact_file(directory, "vanilla.onnx")     # or ArtifactError
    check_file(path, record, check_hashes=True)         # record: a FileRecord (sha256, bytes)
    check_graph_tables(path, max_seq=2048, vocab_size=49152, fused=True)   # positions and tokens it holds
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath, PureWindowsPath

from .bounded_read import read_bounded
from .errors import ArtifactError
from .links import follow_links
from .onnx_external import OnnxFormatError, external_locations, initializer_dims, io_names

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


MAX_NAME_CHARS = 255  # a manifest's file names: a build writes short ones


def relative_inside(text: str) -> bool:
    """Whether ``text`` names a path below a directory when joined to it: not empty, no NUL, not absolute (POSIX or
    Windows, a drive included), no ``..`` part. Symlinks are the caller's to resolve."""
    if not text or "\0" in text:
        return False
    absolute = PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute() or PureWindowsPath(text).drive
    return not absolute and ".." not in PurePosixPath(text.replace("\\", "/")).parts


def plain_name(text: str) -> bool:
    """Whether ``text`` is a path in the one form a build writes: parts joined by single "/", no "." part, no
    trailing "/", no backslash (a separator on Windows)."""
    return "\\" not in text and text == PurePosixPath(text).as_posix() and "." not in text.split("/")


def artifact_file(directory: str | Path, name: object) -> Path:
    """``directory / name`` for a file the manifest names; ArtifactError unless ``name`` is a relative path
    that stays inside the artifact (no absolute path, no ``..``, no NUL byte, no symlink leading out or in a
    loop)."""
    directory = Path(directory)
    text = name if isinstance(name, str) else ""
    if not relative_inside(text):
        raise ArtifactError(f"{directory / MANIFEST} names the file {name!r:.120}, which is not a path inside the "
                            f"artifact: refusing to read it; rebuild the artifact with `medusa-export build`")
    # Names go into messages (one line, short, no escapes), and are keys: "./a" or "a//b" would be a second name for
    # the file "a" or "a/b" that the checks keyed by name do not see
    if not text.isprintable() or len(text) > MAX_NAME_CHARS or not plain_name(text):
        raise ArtifactError(f"{directory / MANIFEST} names the file {name!r:.120}, which is not a file name a build "
                            f"writes (control characters, a path not in its plain form, or over {MAX_NAME_CHARS} "
                            f"characters): rebuild the artifact with `medusa-export build`")
    path = directory / text
    try:
        inside = follow_links(path).is_relative_to(follow_links(directory))
    except OSError as e:  # a loop of links (ELOOP), a component that is a file, no permission
        raise ArtifactError(f"artifact file {path} cannot be resolved ({_why(e)}): rebuild the artifact with "
                            f"`medusa-export build`") from None
    if not inside:
        raise ArtifactError(f"artifact file {path} leads outside {directory} (a symlink): refusing to read it; "
                            f"rebuild the artifact with `medusa-export build`")
    return path


def artifact_dir(directory: str | Path) -> Path:
    """``directory`` as a Path, or ArtifactError saying why it is not an artifact directory (absent, a file)."""
    directory = Path(directory)
    if "\0" in str(directory):
        raise ArtifactError(f"artifact directory {str(directory)!r} contains a NUL byte: give the directory "
                            f"`medusa-export build --out` wrote")
    if not present(directory):
        raise ArtifactError(f"artifact directory {directory} does not exist: run `medusa-export build --out {directory}`")
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not a directory: give the artifact directory `medusa-export build --out` "
                            f"wrote")
    return directory


def present(path: Path) -> bool:
    """Whether anything is at ``path`` (a dangling or looping symlink too); ArtifactError when the file system
    cannot say (a name too long, no permission)."""
    try:
        return path.is_symlink() or path.exists()
    except OSError as e:
        raise ArtifactError(f"{path} cannot be read ({_why(e)}): give the artifact directory `medusa-export build "
                            f"--out` wrote") from None


def is_file(path: Path) -> bool:
    """Whether ``path`` is a regular file; ArtifactError when the file system cannot say (a name too long, no
    permission): `Path.is_file` raises for those."""
    try:
        return path.is_file()
    except OSError as e:
        raise ArtifactError(f"artifact file {path} cannot be read ({_why(e)}): rebuild the artifact") from None


def check_file(path: Path, rec, check_hashes: bool) -> None:
    """A listed file is a regular file of its recorded size (and sha256 when ``check_hashes``)."""
    if not is_file(path):
        raise ArtifactError(f"artifact file {path} is missing (or not a regular file): rebuild the artifact")
    try:
        size = path.stat().st_size
        if size != rec.bytes:
            raise ArtifactError(f"artifact file {path} has {size} bytes, the manifest says {rec.bytes}: it is "
                                f"truncated or replaced, rebuild the artifact")
        if check_hashes and sha256_file(path) != rec.sha256:
            raise ArtifactError(f"artifact file {path} does not match its sha256 in the manifest: it is corrupt, "
                                f"rebuild the artifact")
        # Opened once here: a file only a native library reads (weights.bin, read by ONNX Runtime as a graph's
        # external data) failed there as "cannot load medusa.onnx (SystemError : 13)", naming the wrong file
        path.open("rb").close()
    except OSError as e:
        raise ArtifactError(f"artifact file {path} cannot be read ({_why(e)}): rebuild the artifact") from None


# An ONNX graph file is one protobuf message, which cannot pass 2 GiB (weights past that are external data): a
# larger file is not a graph, and reading it whole to look (a sparse file costs no disk) took all its size in memory.
MAX_GRAPH_BYTES = (2 << 30) - 1


def external_data_names(graph: Path) -> set[str]:
    """The files an ONNX graph file names as external data (`onnx_external`: its protobuf walked, so no entry
    escapes by the order of its fields)."""
    return _parsed_graph(graph, external_locations)


ROTARY_TABLES = ("cos_cache", "sin_cache")  # a fused graph's rotary tables: a row per position, and one more
# The token embedding: a fused graph's (absent where it reads the lm_head's quantized weights), a portable graph's
EMBEDDINGS = ("embed_tokens", "backbone.embed_tokens.weight")


def graph_io_names(graph: Path) -> tuple[list[str], list[str]]:
    """`onnx_external.io_names` of an ONNX graph file: its input and output names, no session opened."""
    return _parsed_graph(graph, io_names)


def check_graph_tables(graph: Path, max_seq: int, vocab_size: int, fused: bool) -> None:
    """ArtifactError unless graph ``graph`` was built for ``vocab_size`` tokens (its token embedding's rows, where
    it has one) and, when ``fused``, for ``max_seq`` positions (its rotary tables hold at least max_seq + 1 rows:
    GroupQueryAttention wants one past the last position; a portable graph computes its rotations). Read from the
    initializers' headers, no weights: a manifest that claimed more failed only when decoding reached the position
    or was fed the token."""
    dims = graph_initializer_dims(graph, {*ROTARY_TABLES, *EMBEDDINGS})
    for name in ROTARY_TABLES if fused else ():
        shapes = dims.get(name, [])
        if not shapes or any(len(s) != 2 for s in shapes):
            raise ArtifactError(f"artifact file {graph} has no 2-D rotary table {name!r}: it is not a fused graph "
                                f"medusa-export builds, rebuild the artifact")
        positions = min(s[0] for s in shapes) - 1
        if positions < max_seq:
            raise ArtifactError(f"artifact file {graph} was built for {max(positions, 0)} positions but the manifest "
                                f"records max_seq {max_seq}: rebuild the artifact (`medusa-export build --max-seq "
                                f"{max_seq}`)")
    rows = {s[0] if len(s) == 2 else -1 for name in EMBEDDINGS for s in dims.get(name, [])}
    if rows - {vocab_size}:
        raise ArtifactError(f"artifact file {graph} embeds {min(rows - {vocab_size})} tokens but the manifest records "
                            f"a vocabulary of {vocab_size}: rebuild the artifact")


def graph_initializer_dims(graph: Path, names: set[str]) -> dict[str, list[tuple[int, ...]]]:
    """`onnx_external.initializer_dims` of an ONNX graph file. Read whole, as `external_data_names` reads it (a
    build's graphs keep their weights in weights.bin: a few hundred KB); not memory-mapped, where a file cut short
    while it is read kills the process (SIGBUS) instead of raising."""
    return _parsed_graph(graph, lambda data: initializer_dims(data, names))


def _parsed_graph(graph: Path, parse):
    """``parse`` of an ONNX graph file's bytes (at most MAX_GRAPH_BYTES); ArtifactError (one line) where the file
    cannot be read or is not a well-formed model."""
    try:
        return parse(read_bounded(graph, MAX_GRAPH_BYTES))
    except OSError as e:
        raise ArtifactError(f"artifact file {graph} cannot be read ({_why(e)}): rebuild the artifact") from None
    except OnnxFormatError as e:
        raise ArtifactError(f"artifact file {graph} is not a well-formed ONNX model ({e}): rebuild the "
                            f"artifact") from None


SHARED_WEIGHTS_FILE = "weights.bin"  # exporter/shared_weights.py: the one file of weights a build's graphs share


def check_external_data(directory: Path, graph_file: str, files: dict) -> None:
    """ArtifactError unless every file graph ``graph_file`` reads its weights from is one a build writes
    (weights.bin, GRAPH.data), listed in the manifest's ``files`` and of its recorded size. ONNX Runtime reads
    some names as orders: before 1.32 it took "*/_ORT_MEM_ADDR_/*" as "the offset is a memory address"
    (measured: a segfault on 1.22)."""
    path = artifact_file(directory, graph_file)
    for name in sorted(external_data_names(path)):
        if name not in (SHARED_WEIGHTS_FILE, graph_file + ".data"):
            raise ArtifactError(f"{path} reads its weights from {name!r:.80}, not a file a build writes "
                                f"({SHARED_WEIGHTS_FILE} or {graph_file}.data): rebuild the artifact")
        if name not in files:
            raise ArtifactError(f"{path} reads its weights from {name!r}, which the manifest does not list: "
                                f"rebuild the artifact")
        check_file(artifact_file(directory, name), files[name], check_hashes=False)


def _why(e: BaseException) -> str:
    """An OS error's reason without the path it repeats."""
    return getattr(e, "strerror", None) or str(e)[:80] or type(e).__name__
