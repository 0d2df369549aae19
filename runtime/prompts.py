"""Prompt files: JSON Lines with a "prompt" field per line (extra fields ignored).

    prompts = read_prompts("../shared/data/mt_bench.jsonl", limit=10)
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """Non-empty prompts in file order; an `InputError` names the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompts file {path} does not exist: pass a .jsonl file with one {{\"prompt\": ...}} per line")
    prompts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {lineno}: not valid JSON ({e.msg}): fix that line") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{path} line {lineno}: needs a non-empty string field \"prompt\"")
        prompts.append(prompt)
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise InputError(f"prompts file {path} has no prompts: add lines like {{\"prompt\": \"...\"}}")
    return prompts
