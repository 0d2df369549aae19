#!/usr/bin/env python
"""Medusa-2 runs side by side, from their training.json: the KL weight / length / per-head rates each ran with,
and what held-out evaluation says of it (backbone agreement with the original, heads before and after).

    python scripts/medusa2_runs.py models/smollm2-medusa2 scripts/results/default_cpu/medusa2/training_lm5.json

Each argument is a Medusa-2 model directory or a training.json. Prints a markdown table (docs/results.md's
learning curve and weight sweep are made with it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from script_io import run_main  # noqa: E402


def load_record(path: Path) -> dict:
    file = path / "training.json" if path.is_dir() else path
    try:
        record = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"error: {file}: {e.__class__.__name__} — pass a Medusa-2 model directory or its training.json")
    if record.get("mode") != "medusa2":
        sys.exit(f"error: {file} is not a Medusa-2 training record (mode {record.get('mode')!r})")
    return record


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}".removeprefix("0")  # None: no held-out positions


def row(name: str, r: dict) -> list[str]:
    o, ev = r["options"], r["eval"]
    b, before, after = ev["backbone_vs_original"], ev["heads_before_joint"], ev["heads_after_joint"]
    return [name, f"{o['lm_weight']:g}", o.get("head_lrs") or f"{o['heads_lr']:g}", str(r["train_sequences"]),
            str(r["joint_steps"]), _num(b["top1_agreement"]), _num(b["mean_kl"]),
            " / ".join(map(_num, after["top1"])), f"{_num(before['chain_accept'])} → {_num(after['chain_accept'])}"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="Medusa-2 model directories or training.json files")
    a = p.parse_args(argv)
    head = ["run", "KL weight", "heads' rate(s)", "sequences", "steps", "agreement", "mean KL",
            "heads' top-1 after (0/1/2/3)", "expected accepted, chain (before → after)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for path in a.runs:
        name = path.name if path.is_dir() else path.stem.removeprefix("training_")
        lines.append("| " + " | ".join(row(name, load_record(path))) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
