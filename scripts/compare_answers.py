"""Greedy answers of two artifacts side by side (e.g. the original model and its Medusa-2 fine-tune).

    python scripts/compare_answers.py artifacts/smollm2 artifacts/smollm2-medusa2 \\
        --prompts question.jsonl --limit 5 --markdown answers.md --json answers.json

Each prompt is decoded greedily by both artifacts' vanilla graphs (their own backbones). Reports, per prompt,
how many leading tokens agree, the share of positions with the same token and each answer's share of repeated
word 4-grams (a fine-tune that drifts into loops shows there first), then both texts. A quality check
next to the speed: Medusa-2 changes the backbone, so its greedy answers are allowed to differ, and this shows
how much.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medusa_export.runtime.api import MedusaRuntime
from medusa_export.runtime.prompts import read_prompts
from script_io import positive, run_main, with_machine, writable, write_json  # noqa: E402


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def repeated_share(text: str, n: int = 4) -> float:
    """Share of the answer's word n-grams that already occurred earlier in it (0: no repetition)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first", type=Path)
    p.add_argument("second", type=Path)
    p.add_argument("--prompts", type=Path, required=True)
    p.add_argument("--limit", type=positive, default=5)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=writable, default=None)
    p.add_argument("--markdown", type=writable, default=None)
    a = p.parse_args()
    prompts = read_prompts(a.prompts)[:a.limit]
    answers = []
    for path in (a.first, a.second):
        with MedusaRuntime.load(path, threads=a.threads) as rt:
            answers.append([rt.generate(q, max_new_tokens=a.max_new_tokens, medusa=False) for q in prompts])
    rows, md = [], [f"| prompt | same first tokens | same token at position | repeated 4-grams | {a.first.name} | "
                    f"{a.second.name} |", "|---|---|---|---|---|---|"]
    for q, x, y in zip(prompts, *answers):
        same = sum(i == j for i, j in zip(x.token_ids, y.token_ids)) / max(1, min(len(x.token_ids), len(y.token_ids)))
        row = {"prompt": q, "common_prefix_tokens": _common_prefix(x.token_ids, y.token_ids),
               "same_position_share": round(same, 3), "repeated_4grams": [round(repeated_share(x.text), 3),
                                                                          round(repeated_share(y.text), 3)],
               "first": x.text, "second": y.text}
        rows.append(row)
        print(f"--- {q[:80]!r}: {row['common_prefix_tokens']} leading tokens agree, {same:.0%} same position\n"
              f"[{a.first.name}] {x.text}\n[{a.second.name}] {y.text}\n")
        cell = lambda t: t.replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
        r1, r2 = row["repeated_4grams"]
        md.append(f"| {cell(q)} | {row['common_prefix_tokens']} | {same:.0%} | {r1:.2f} / {r2:.2f} | {cell(x.text)} | "
                  f"{cell(y.text)} |")
    mean_rep = [round(sum(r["repeated_4grams"][i] for r in rows) / max(1, len(rows)), 3) for i in (0, 1)]
    print(f"repeated word 4-grams, mean: {a.first.name} {mean_rep[0]}, {a.second.name} {mean_rep[1]}")
    if a.json:
        write_json(a.json, with_machine({"first": a.first.name, "second": a.second.name, "max_new_tokens": a.max_new_tokens,
                                         "mean_repeated_4grams": mean_rep, "rows": rows}), indent=2)
    if a.markdown:
        a.markdown.write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    run_main(main)
