"""read_prompts: a limit is the exact number of prompts, and a prompt that is no text names its file and line;
`generate --prompt -` reads the prompt from standard input."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest

from medusa_export.runtime.errors import InputError
from medusa_export.runtime.prompts import read_prompts


def test_read_prompts_takes_exactly_limit_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(3)))
    assert [len(read_prompts(path, limit=n)) for n in (1, 2, 3, 9)] == [1, 2, 3, 3]
    for limit in (0, -1):
        with pytest.raises(InputError, match="at least one prompt"):
            read_prompts(path, limit=limit)


def test_a_prompt_that_is_no_text_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": "\\udcff"}\n')
    with pytest.raises(InputError, match=re.escape(f"{path} line 2: ") + ".*lone surrogate"):
        read_prompts(path)


def test_a_prompt_past_the_limit_names_the_file_and_the_line(tmp_path, monkeypatch):
    """A 20 MB prompt was refused by the chat template's limits, as "send a shorter conversation, or fix the model's
    template", naming neither the file nor the line."""
    from medusa_export.runtime import prompts, template_limits

    assert prompts.MAX_PROMPT_CHARS * 2 <= template_limits.MAX_OUTPUT  # a template may add to it and still render
    monkeypatch.setattr(prompts, "MAX_PROMPT_CHARS", 100)
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a" * 100}) + "\n" + json.dumps({"prompt": "a" * 101}) + "\n")
    with pytest.raises(InputError, match=re.escape(f"{path} line 2: the prompt is 101 characters, past the 100")):
        read_prompts(path)


def test_an_integer_too_long_to_parse_is_a_bad_line_not_a_crash(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": "t1", "x": ' + "1" * 5000 + "}\n")
    with pytest.raises(InputError, match=re.escape(f"{path} line 2: not valid JSON (an integer with too many digits)")):
        read_prompts(path)


def test_a_limit_reads_no_further_than_its_prompts(tmp_path, monkeypatch):
    """Lines are read as they are needed: with --limit 1 a file whose later part is huge, or not text, costs the
    first line. A line past MAX_LINE_BYTES is refused by itself, never read whole (a 6 GB file of no newline was
    read into memory, then reported as the machine being out of it)."""
    from medusa_export.runtime import prompts

    monkeypatch.setattr(prompts, "MAX_LINE_BYTES", 1024)
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "first"}\r\n' + b"\xff" * 5000 + b"\n")
    assert read_prompts(path, limit=1) == ["first"]
    with pytest.raises(InputError, match=re.escape(str(path)) + " line 2 is longer than 1,024 bytes"):
        read_prompts(path)
    exact = json.dumps({"prompt": "x" * 1000}).encode()
    exact += b" " * (1024 - len(exact))  # a line of exactly the limit, with or without its newline
    for data in (exact + b"\n", exact):
        path.write_bytes(data)
        assert read_prompts(path) == ["x" * 1000]
    path.write_bytes(b'{"prompt": "first"}\n\xff\xfe\n')
    with pytest.raises(InputError, match=re.escape(str(path)) + " line 2 is not UTF-8 text"):
        read_prompts(path)


def test_a_sharegpt_file_with_a_byte_order_mark_is_read(tmp_path):
    """A prompts JSONL with a BOM was read; the same BOM on a ShareGPT .json was "not ShareGPT-shaped"."""
    from medusa_export.exporter.training.prompt_source import load_prompt_set

    record = {"conversations": [{"from": "human", "value": "Describe the water cycle in a few short sentences."},
                                {"from": "gpt", "value": "Water evaporates, condenses and falls."}]}
    data = tmp_path / "mine.json"
    data.write_bytes(b"\xef\xbb\xbf" + json.dumps([record]).encode())
    assert load_prompt_set(data).prompts == [record["conversations"][0]["value"]]


@pytest.mark.parametrize("kind, words", [("dir", "is a directory"), ("fifo", "is not a regular file"),
                                         ("missing", "does not exist")])
def test_a_sharegpt_path_that_is_no_file_is_named_for_what_it_is(tmp_path, kind, words):
    """`--data some.json` naming a directory said "does not exist"."""
    import os

    from medusa_export.exporter.training.prompt_source import load_prompt_set

    data = tmp_path / "conv.json"
    if kind == "dir":
        data.mkdir()
    elif kind == "fifo":
        os.mkfifo(data)
    with pytest.raises(InputError, match=rf"^data file .*conv\.json {words}: pass 'sharegpt'"):
        load_prompt_set(data)


def _generate_stdin(artifact, data: bytes | None, *args: str) -> subprocess.CompletedProcess:
    """`generate ARTIFACT --prompt - ARGS` with ``data`` on standard input (None: standard input closed)."""
    code = "import sys; from medusa_export.runtime.cli.app import main; sys.argv[0] = 'medusa-export'; main()"
    return subprocess.run([sys.executable, "-c", code, "generate", str(artifact), "--prompt", "-", *args],
                          input=data, stdin=subprocess.DEVNULL if data is None else None, capture_output=True,
                          timeout=300, preexec_fn=None if data is not None else lambda: os.close(0))


def test_prompt_dash_reads_standard_input_as_the_prompt(artifact):
    """`--prompt -` answers what `--prompt TEXT` answers, with the line break `echo` adds and a byte order mark
    dropped."""
    flags = ("--no-chat", "--max-new-tokens", "6", "--json")
    given = subprocess.run([sys.executable, "-c", "import sys; from medusa_export.runtime.cli.app import main; "
                            "sys.argv[0] = 'medusa-export'; main()", "generate", str(artifact), "--prompt", "t5 t6 t7",
                            *flags], capture_output=True, timeout=300)
    assert given.returncode == 0, given.stderr
    for data in (b"t5 t6 t7\n", b"\xef\xbb\xbft5 t6 t7\r\n", b"t5 t6 t7"):
        piped = _generate_stdin(artifact, data, *flags)
        assert piped.returncode == 0, piped.stderr
        assert json.loads(piped.stdout)["token_ids"] == json.loads(given.stdout)["token_ids"], data


@pytest.mark.parametrize("data, words", [(b"\xff\xfe bad", "not UTF-8 text (byte 0 is 0xff)"),
                                         (b"\n", "--prompt is empty"), (None, "standard input, which is closed")])
def test_prompt_dash_refuses_what_is_no_prompt_in_one_line(artifact, data, words):
    proc = _generate_stdin(artifact, data)
    lines = [ln for ln in proc.stderr.decode().splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr


def test_prompt_dash_names_a_standard_input_it_cannot_read(artifact, tmp_path):
    """`0>file` (standard input opened for writing only) was an OSError traceback, exit 1."""
    code = "import sys; from medusa_export.runtime.cli.app import main; sys.argv[0] = 'medusa-export'; main()"
    with open(tmp_path / "written", "w") as write_only:
        proc = subprocess.run([sys.executable, "-c", code, "generate", str(artifact), "--prompt", "-"],
                              stdin=write_only, capture_output=True, timeout=300)
    lines = [ln for ln in proc.stderr.decode().splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "cannot read standard input" in lines[0], proc.stderr


def test_prompt_dash_refuses_a_prompt_past_the_limit(monkeypatch):
    from medusa_export.runtime import prompts
    from medusa_export.runtime.cli.generate_cmd import stdin_prompt

    monkeypatch.setattr(prompts, "MAX_PROMPT_CHARS", 10)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(("é" * 10 + "\n").encode())))
    assert stdin_prompt() == "é" * 10  # ten characters of two bytes each, and the final line break dropped
    for data in (("é" * 11).encode(), b"a" * 46):  # 46 bytes: past what 10 characters, a BOM and CRLF can take
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
        with pytest.raises(InputError, match="over 10 characters"):
            stdin_prompt()
