"""Prompt files (JSON Lines with a "prompt" field): what is read, and errors that name the bad line."""

from __future__ import annotations

import pytest

from medusa_export.runtime.errors import InputError
from medusa_export.runtime.prompts import read_prompts


@pytest.mark.parametrize("text, line", [
    ('{"prompt": "a"}\nnot json\n', 2),
    ('{"prompt": "a"}\n{"prompt": "b"\n', 2),
    ('{"prompt": "a"}\n\n{"text": "b"}\n', 3),
    ('{"prompt": ""}\n', 1),
    ('{"prompt": "   "}\n', 1),
    ('{"prompt": 3}\n', 1),
    ('["prompt"]\n', 1),
])
def test_bad_line_is_named(tmp_path, text, line):
    f = tmp_path / "p.jsonl"
    f.write_text(text)
    with pytest.raises(InputError, match=f"line {line}"):
        read_prompts(f)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n \n")
    with pytest.raises(InputError, match="no prompts"):
        read_prompts(tmp_path / "e.jsonl")


def test_reads_in_order_skips_blank_lines_ignores_extra_fields_and_limits(tmp_path):
    f = tmp_path / "ok.jsonl"
    f.write_text('{"prompt": "x", "other": 1}\n\n{"prompt": "y"}\n{"prompt": "z"}\n')
    assert read_prompts(f) == ["x", "y", "z"]
    assert read_prompts(f, limit=2) == ["x", "y"]


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\u0085"])
def test_raw_line_separators_inside_a_string_stay_in_the_prompt(tmp_path, char):
    """json.dumps(ensure_ascii=False) writes these raw; only "\\n" ends a JSON Lines line."""
    import json

    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in [f"a{char}b", "c"]),
                 encoding="utf-8")
    assert read_prompts(f) == [f"a{char}b", "c"]


def test_crlf_line_ends_are_read(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_bytes(b'{"prompt": "x"}\r\n\r\n{"prompt": "y"}\r\nnot json\r\n')
    with pytest.raises(InputError, match="line 4"):
        read_prompts(f)
    assert read_prompts(f, limit=2) == ["x", "y"]


def test_a_directory_is_named_as_a_directory(tmp_path):
    with pytest.raises(InputError, match="is a directory") as e:
        read_prompts(tmp_path)
    assert "does not exist" not in str(e.value)


def test_a_fifo_or_device_is_named_as_not_a_regular_file(tmp_path):
    """Both were said not to exist."""
    import os

    os.mkfifo(tmp_path / "p.fifo")
    for path in (tmp_path / "p.fifo", "/dev/zero"):
        with pytest.raises(InputError, match="is not a regular file"):
            read_prompts(path)


def test_a_byte_order_mark_is_skipped(tmp_path):
    """Windows editors write one; it was refused as a line that is not JSON."""
    f = tmp_path / "p.jsonl"
    f.write_bytes('{"prompt": "x"}\n{"prompt": "y"}\n'.encode("utf-8-sig"))
    assert read_prompts(f) == ["x", "y"]
