"""Prompt files: JSON Lines with a "prompt" field per line (extra fields ignored), and the packaged prompt set.

    prompts = read_prompts("question.jsonl", limit=10)     # a file the user passes
    prompts = read_prompts(None, limit=8)                  # the packaged set (PACKAGED_PROMPTS)

The packaged set (``runtime/data/prompts.jsonl``: 40 prompts written for this project, across writing, reasoning,
math, coding, extraction, knowledge and role-play) is what `bench`, `verify`, `calibrate-tree` and the quantized
build's quality check use when no file is given, so every command runs from the package alone. MT-Bench, the
reporting set, is a file the user passes (FastChat publishes it as ``question.jsonl``; see docs/results.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError

PACKAGED_PROMPTS = Path(__file__).resolve().parent / "data" / "prompts.jsonl"


def read_prompts(path: str | Path | None, limit: int | None = None) -> list[str]:
    """Non-empty prompts in file order (``path`` None: the packaged set); an `InputError` names the first bad
    line. Rows may give the prompt as ``"prompt"`` or, as MT-Bench's ``question.jsonl`` does, as the first of
    ``"turns"``."""
    path = Path(path) if path is not None else PACKAGED_PROMPTS
    if limit is not None and limit < 1:
        raise InputError(f"a prompt limit of {limit}: ask for at least one prompt")
    check_jsonl_file(path, "prompts file")
    prompts = []
    for lineno, row in jsonl_rows(path):
        prompt = prompt_of(row)
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{path} line {lineno}: needs a non-empty string field \"prompt\" (or \"turns\")")
        check_text(prompt, path, lineno)
        prompts.append(prompt)
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise InputError(f"prompts file {path} has no prompts: add lines like {{\"prompt\": \"...\"}}")
    return prompts


def check_jsonl_file(path: Path, what: str) -> None:
    """A one-line `InputError` unless ``path`` is a readable file (a directory is named as one, not as missing)."""
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory: pass a .jsonl file with one {{\"prompt\": ...}} per line")
    if path.exists() and not path.is_file():  # a FIFO or a device: reading it could wait or never end
        raise InputError(f"{what} {path} is not a regular file: pass a .jsonl file with one {{\"prompt\": ...}} "
                         f"per line")
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist: pass a .jsonl file with one {{\"prompt\": ...}} per line")


MAX_LINE_BYTES = 64 << 20  # one line of a JSON Lines file: far past any prompt, short of filling the memory


def jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, decoded JSON) of every non-blank line, read as they are asked for (a caller that stops early,
    ``--limit 1``, reads no further); an `InputError` names the first line that is not JSON, not UTF-8, or longer
    than `MAX_LINE_BYTES`.

    Lines end at "\\n" (or "\\r\\n") only: JSON strings may hold U+2028, U+0085 and the like raw (what
    ``json.dumps(ensure_ascii=False)`` writes), which ``str.splitlines`` would take for line ends."""
    try:
        with open(path, "rb") as f:
            for lineno, raw in _lines(f, path):
                if lineno == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte order mark (Windows editors write one)
                try:
                    line = raw.decode("utf-8").removesuffix("\r")
                except UnicodeDecodeError as e:
                    raise InputError(f"{path} line {lineno} is not UTF-8 text ({e.reason}): pass a JSON Lines file "
                                     f"in UTF-8") from None
                if line.strip():
                    yield lineno, _json_line(line, path, lineno)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}: pass a readable JSON Lines file") from None


def _lines(f, path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its "\\n") of a binary file, each at most `MAX_LINE_BYTES` (an InputError
    beyond)."""
    lineno = 0
    while True:
        line = f.readline(MAX_LINE_BYTES + 2)  # the longest line allowed, its "\\n", and one byte to tell
        if not line:
            return
        lineno += 1
        line = line.removesuffix(b"\n")
        if len(line) > MAX_LINE_BYTES:
            raise InputError(f"{path} line {lineno} is longer than {MAX_LINE_BYTES:,} bytes: give one JSON object "
                             f"of a prompt per line")
        yield lineno, line


def _json_line(line: str, path: Path, lineno: int) -> object:
    try:
        return json.loads(line)
    except (ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, or an integer of > 4,300 digits
        why = e.msg if isinstance(e, json.JSONDecodeError) else \
            "nested too deeply" if isinstance(e, RecursionError) else "an integer with too many digits"
        raise InputError(f"{path} line {lineno}: not valid JSON ({why}): fix that line") from None


def prompt_of(row: object) -> object:
    """A row's prompt: ``"prompt"``, else the first of ``"turns"`` (None when neither is there)."""
    if not isinstance(row, dict):
        return None
    if "prompt" in row:
        return row["prompt"]
    turns = row.get("turns")
    return turns[0] if isinstance(turns, list) and turns else None


MAX_PROMPT_CHARS = 1 << 23  # one prompt of a file: far past any artifact's context, well within what a chat
# template may render (`template_limits.MAX_OUTPUT`, 16 M), which a longer one met first, naming neither file nor line


def check_text(prompt: str, path: Path, lineno: int) -> None:
    """A prompt of at most MAX_PROMPT_CHARS characters, and text: JSON escapes can spell a lone surrogate
    ("\\udcff"), which the tokenizer would fail on later without naming the file or the line."""
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"{path} line {lineno}: the prompt is {len(prompt):,} characters, past the "
                         f"{MAX_PROMPT_CHARS:,} a prompt may hold: shorten it")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{path} line {lineno}: the prompt holds {prompt[e.start]!a}, a lone surrogate, not text: "
                         f"fix that line") from None
