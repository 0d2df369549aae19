"""read_prompts: a limit is the exact number of prompts, and a prompt that is no text names its file and line."""

from __future__ import annotations

import json
import re

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


def test_an_integer_too_long_to_parse_is_a_bad_line_not_a_crash(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": "t1", "x": ' + "1" * 5000 + "}\n")
    with pytest.raises(InputError, match=re.escape(f"{path} line 2: not valid JSON (an integer with too many digits)")):
        read_prompts(path)
