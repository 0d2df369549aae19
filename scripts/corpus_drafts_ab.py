"""Corpus drafts side by side in one process: each prompt decoded greedily without speculation, with the default
speculation and no corpus table (heads + context drafts), with the artifact's table too, and (an artifact with heads)
with the table but never the heads (drafts on the vanilla graph); in rotating order per prompt, so they share the
machine's state. Reports tokens/s (decoding and prefill), tokens per step,
accepted draft tokens per step by source and draft rows per step, and checks every answer against vanilla.

    python scripts/corpus_drafts_ab.py ARTIFACT --prompts question.jsonl --limit 16 [--max-new-tokens 128]
        [--threads 2] [--no-heads] [--other-table OTHER/corpus_drafts.npz] [--json out.json]

``--other-table``: one more row, speculation with another build's table for the same model (e.g. one built without
the model's own answers), so that two tables are compared on the same graphs in one run. ``--one-row-unmeasured``: one
more row, speculation with the table whose one-row step is never run just to measure it (`speculation.PLAIN_MIN`:
the planner before it). ``--library``: a kernel library file to load instead of the one compiled from this checkout.

Each row has its own speculation state (acceptance rates, step costs, the two graphs' weighed steps), as a process
running only that configuration would: with one shared state the rows' drafts were chosen by their mixed acceptance
(two tables' drafts share rate classes) and the row without the heads fed the graph choice of the others.

ARTIFACT must carry a corpus-draft table (`build --corpus-drafts sharegpt`; the built-in model's default).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from medusa_export.runtime import kernels
from medusa_export.runtime.api import MedusaRuntime
from medusa_export.runtime.corpus_drafts import CorpusTable
from medusa_export.runtime.machine import machine_info
from medusa_export.runtime.prompts import read_prompts
from medusa_export.runtime.speculation import Speculation, StepCost

sys.path.insert(0, str(Path(__file__).resolve().parent))
from script_io import positive, run_main, writable, write_json  # noqa: E402

MODES = ("vanilla", "speculation, no table", "speculation + table", "drafts + table, no heads")
UNMEASURED = "speculation + table, one row unmeasured"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--prompts", default=None)
    ap.add_argument("--limit", type=positive, default=16)
    ap.add_argument("--max-new-tokens", type=positive, default=128)
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--no-heads", action="store_true", help="drafts only: the heads' tree is never verified")
    ap.add_argument("--other-table", default=None, help="another table for this model: one more row")
    ap.add_argument("--one-row-unmeasured", action="store_true", help="one more row: the one-row step never measured")
    ap.add_argument("--library", default=None, help="a kernel library to load instead of this checkout's")
    ap.add_argument("--json", type=writable, default=None)
    args = ap.parse_args()
    if args.library:
        kernels.library_path = lambda: args.library
    rt = MedusaRuntime.load(args.artifact, threads=args.threads)
    gen = rt.generator
    table = gen.spec.corpus
    if table is None:
        raise SystemExit(f"{args.artifact} has no corpus-draft table: build it with --corpus-drafts sharegpt")
    heads = None if args.no_heads else gen.tree
    gen.tree = heads
    modes = MODES if heads is not None else MODES[:3]
    tables = {mode: table for mode in modes if "table" in mode and "no table" not in mode}
    if args.other_table:
        modes = (*modes, "speculation + other table")
        tables[modes[-1]] = CorpusTable.load(args.other_table, rt.manifest.dims.vocab_size)
    if args.one_row_unmeasured:
        modes = (*modes, UNMEASURED)
        tables[UNMEASURED] = table
    prompts = read_prompts(args.prompts, limit=args.limit)
    totals = {m: {"tokens": 0, "seconds": 0.0, "steps": 0, "accepted_heads": 0, "accepted_context": 0,
                  "context_rows": 0, "identical": 0} for m in modes}
    rt.generate(prompts[0], max_new_tokens=8)  # opens and runs both graphs once before anything is timed
    rt.generate(prompts[0], max_new_tokens=8, medusa=False)
    states = {mode: Speculation() for mode in modes}
    if UNMEASURED in states:
        states[UNMEASURED].alone_cost = {True: StepCost(plain_steps=False), False: StepCost(plain_steps=False)}
    for i, prompt in enumerate(prompts):
        answers = {}
        for mode in np.roll(modes, -i):
            gen.spec = states[mode]
            gen.spec.corpus = tables.get(mode)
            gen.tree = None if mode.endswith("no heads") else heads
            r = rt.generate(prompt, max_new_tokens=args.max_new_tokens, medusa=mode != "vanilla")
            t = totals[mode]
            t["tokens"] += r.new_tokens
            t["seconds"] += r.new_tokens / r.tokens_per_s if r.new_tokens else 0.0
            t["steps"] += r.steps
            for key in ("accepted_heads", "accepted_context", "context_rows"):
                t[key] += getattr(r, key)
            answers[mode] = r.token_ids
        for mode in modes:
            totals[mode]["identical"] += answers[mode] == answers["vanilla"]
    rows = {}
    for mode, t in totals.items():
        steps = max(t["steps"], 1)
        rows[mode] = {"tokens_per_s": round(t["tokens"] / t["seconds"], 2) if t["seconds"] else 0.0, "tokens_per_step": round(t["tokens"] / steps, 3),
                      **{k: round(t[k] / steps, 3) for k in ("accepted_heads", "accepted_context", "context_rows")},
                      "identical": f"{t['identical']}/{len(prompts)}"}
    base = rows["vanilla"]["tokens_per_s"]
    for mode, row in rows.items():
        row["speed_up"] = round(row["tokens_per_s"] / base, 3) if base else None
        print(f"{mode:40s} {row['tokens_per_s']:7.2f} tok/s  {row['speed_up'] or 0:.2f}x  {row['tokens_per_step']:.2f} tok/step  "
              f"accepted heads {row['accepted_heads']:.2f} / drafts {row['accepted_context']:.2f}  draft rows "
              f"{row['context_rows']:.2f}  identical {row['identical']}")
    report = {"artifact": args.artifact, "prompts": args.prompts, "limit": args.limit,
              "max_new_tokens": args.max_new_tokens, "threads": args.threads, "heads": not args.no_heads,
              "other_table": args.other_table, "library": args.library,
              "machine": machine_info(), "rows": rows}
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    run_main(main)
