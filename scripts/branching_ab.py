"""Single stream on one kernel artifact of one path, with and without branching steps (drafts that leave the heads'
chain, verified as masked steps: `decode.step_paths`), interleaved prompt by prompt in alternating order so that a
drifting machine weighs on both alike. Greedy; every answer is checked against the artifact's vanilla answer.

    python scripts/branching_ab.py artifacts/smollm2-fast --prompts mt_bench.jsonl --limit 16 [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

from medusa_export.runtime.api import MedusaRuntime
from medusa_export.runtime.machine import machine_info
from medusa_export.runtime.prompts import read_prompts

PLANS = ("one path", "branching")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    rt = MedusaRuntime.load(args.artifact, threads=args.threads)
    backend = rt.generator.backend
    chunk = backend.branch_chunk
    if chunk is None:
        raise SystemExit(f"{args.artifact}: not a one-path kernel artifact (nothing to compare)")
    prompts = [rt.generator.tokenizer.encode_prompt(p) for p in read_prompts(args.prompts, limit=args.limit)]
    vanilla = [rt.generate(ids, max_new_tokens=args.max_new_tokens, medusa=False).token_ids for ids in prompts]
    for ids in prompts[:4]:  # warm-up: both graphs, step costs and rates measured before anything is timed
        for plan in PLANS:
            backend.branch_chunk = chunk if plan == "branching" else None
            rt.generate(ids, max_new_tokens=args.max_new_tokens)
    totals = {p: {"tokens": 0, "seconds": 0.0, "steps": 0, "identical": 0} for p in PLANS}
    for r in range(args.rounds):
        for i, ids in enumerate(prompts):
            for plan in (PLANS if (i + r) % 2 == 0 else PLANS[::-1]):
                backend.branch_chunk = chunk if plan == "branching" else None
                t0 = time.perf_counter()
                res = rt.generate(ids, max_new_tokens=args.max_new_tokens)
                t = totals[plan]
                t["seconds"] += time.perf_counter() - t0
                t["tokens"] += res.new_tokens
                t["steps"] += res.steps
                t["identical"] += res.token_ids == vanilla[i]
    backend.branch_chunk = chunk
    rows = {p: {"tokens_per_s": round(t["tokens"] / t["seconds"], 1),
                "tokens_per_step": round(t["tokens"] / max(t["steps"], 1), 3),
                "identical": f"{t['identical']}/{args.rounds * len(prompts)}"} for p, t in totals.items()}
    print(json.dumps(rows, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"artifact": args.artifact, "prompts": args.prompts, "limit": args.limit, "rounds": args.rounds,
                       "max_new_tokens": args.max_new_tokens, "threads": args.threads, "machine": machine_info(),
                       "plans": rows}, f, indent=1)


if __name__ == "__main__":
    main()
