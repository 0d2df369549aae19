"""What records (manifests, training.json) say about where things came from: names and sha256, never a path
of the machine that wrote them, since the records travel with the artifacts and heads.

    portable_path("/home/me/repo/data/p.jsonl")   # "data/p.jsonl" when run from /home/me/repo, else "p.jsonl"
    content_sha256(Path("heads/mine"))            # sha256 over the weights and config files
    portable_command(sys.argv)                    # the command line with absolute paths made portable
    record_name("evil\x1b[31mname")              # "evil?[31mname": a name a record can show on one line
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from medusa_export.runtime.artifact_files import sha256_file
from medusa_export.runtime.manifest_records import MAX_NAME_CHARS, display_name

_CONTENT_PATTERNS = ("config.json", "*.safetensors", "*.gguf", "*.pt", "*.bin")


def record_name(name: str | None, limit: int = MAX_NAME_CHARS) -> str | None:
    """``name`` (a directory's or file's name) with characters that are not printable (newlines, terminal escapes)
    as "?", at most ``limit`` characters: records are shown in messages, `/v1/models` and `bench` reports. The same
    rule the manifest's reader applies (`display_name`)."""
    return display_name(name, limit)


def portable_path(path: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """``path`` relative to ``base`` (default: the working directory) when it lies inside it, else its name."""
    p = Path(path)
    base = Path(base) if base is not None else Path.cwd()
    if not p.is_absolute():
        p = Path.cwd() / p
    try:
        return Path(os.path.normpath(p)).relative_to(base.resolve()).as_posix()
    except ValueError:
        return p.name


def content_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a directory's weight and config files (name and sha256 of each, sorted)."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    h = hashlib.sha256()
    files = sorted({f for pattern in _CONTENT_PATTERNS for f in p.glob(pattern) if f.is_file()})
    for f in files:
        h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def portable_command(argv: list[str]) -> str:
    """The command line as typed, with every absolute path that exists made portable."""
    return " ".join(portable_path(a) if os.path.isabs(a) and os.path.exists(a) else a for a in argv)
