"""Where training prompts come from: ``--data sharegpt`` (the PyPI package), a ShareGPT-format ``.json``
or a prompts JSONL file.

    ps = load_prompt_set("sharegpt")
    ps.prompts        # filtered, in source order
    ps.provenance     # {"source": "sharegpt", "package": ..., "version": ..., "sha256": ..., "filters": {...}}

Both kinds go through the same filters; every prompt set drops copies and near copies of the evaluation set
(MT-Bench by default), so benchmark prompts stay unseen whatever file a user passes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medusa_export.runtime.errors import InputError
from medusa_export.runtime.artifact_files import sha256_file
from medusa_export.runtime.prompts import read_prompts

from . import sharegpt
from .prompt_filters import EvalFingerprints, PromptFilter, filter_prompts, shipped_eval_fingerprints

SHAREGPT = "sharegpt"


@dataclass
class PromptSet:
    name: str  # what training.json names the data by (no machine paths)
    prompts: list[str]
    provenance: dict = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        """Of the prompts themselves: what the distillation cache is keyed on."""
        return hashlib.sha256(json.dumps(self.prompts).encode()).hexdigest()


def load_prompt_set(data: str | Path, filters: PromptFilter | None = None, exclude: str | Path | None = None,
                    later_turns: bool = False) -> PromptSet:
    """Read and filter prompts. ``exclude``: an evaluation prompts JSONL or fingerprints JSON (default MT-Bench)."""
    fingerprints = EvalFingerprints.from_file(exclude) if exclude else shipped_eval_fingerprints()
    bundled = str(data) == SHAREGPT
    if bundled or str(data).endswith(".json"):  # the package's file, or a ShareGPT-format export of one's own
        path = sharegpt.sharegpt_file() if bundled else Path(data)
        _check_data_file(path)
        convs, report = sharegpt.read_conversations(path)
        rows = sharegpt.human_prompts(convs, later_turns=later_turns)
        raw = [text for _, text in rows]
        source = {"source": SHAREGPT if bundled else "sharegpt-format", "file": path.name,
                  "reader": report.as_dict(), "conversations_without_prompt": sharegpt.without_prompt(convs),
                  "later_turns": later_turns}
        if bundled:
            source.update(package=sharegpt.PACKAGE, version=sharegpt.package_version())
        filters = filters or PromptFilter()
    else:
        path = Path(data)
        raw = read_prompts(path)
        source = {"source": "jsonl", "file": path.name}
        # A user's own file is taken as given, except for duplicates and evaluation overlap.
        filters = filters or PromptFilter(min_chars=1, max_chars=1 << 30, english_only=False)
    source["sha256"] = sha256_file(path)
    keep, counts = filter_prompts(raw, filters, fingerprints)
    if not keep:
        hint = ", or another --exclude-eval set (it removes every prompt it holds)" if counts.get("eval_overlap") else ""
        raise InputError(f"{path.name}: no prompts left after filtering ({_removed(counts)}): pass prompts these "
                         f"filters keep{hint}")
    provenance = {**source, "filters": asdict(filters), "excluded_eval_set": fingerprints.name,
                  "excluded_eval_questions": len(fingerprints.questions), "counts": counts}
    return PromptSet(SHAREGPT if bundled else path.name, [raw[i] for i in keep], provenance)


def _check_data_file(path: Path) -> None:
    """A one-line InputError unless ``path`` is a regular file (a directory or a FIFO was named as missing)."""
    if path.is_file():
        return
    what = ("is a directory" if path.is_dir() else "is not a regular file" if path.exists() else "does not exist")
    raise InputError(f"data file {path} {what}: pass 'sharegpt', a ShareGPT .json or a prompts .jsonl")


def _removed(counts: dict) -> str:
    """``input 4, eval_overlap 4``: what came in and each filter that removed something."""
    return ", ".join(f"{k} {v}" for k, v in counts.items() if k == "input" or (v and k != "kept"))
