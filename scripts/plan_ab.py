"""Single-stream speed of one artifact under different step plans, interleaved prompt by prompt in rotating order
(so that a drifting machine weighs on each alike): ``one-path`` (a step's tree stays within one root-to-leaf path
beyond the heads' tree, one draft per step: how kernel artifacts ran before), ``branching`` (drafts may leave the
heads' tree), ``runner-up`` (also the other source's draft where it pays; the default). Greedy; every answer is
checked against the artifact's vanilla answer.

    python scripts/plan_ab.py artifacts/smollm2-fast --prompts mt_bench.jsonl --limit 16 [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

from medusa_export.runtime.api import MedusaRuntime
from medusa_export.runtime.machine import machine_info
from medusa_export.runtime.prompts import read_prompts

PLANS = ("one-path", "branching", "runner-up")


def set_plan(rt, plan: str, max_paths) -> None:
    rt.generator.backend.max_paths = 1 if plan == "one-path" else max_paths
    rt.generator.spec.runner_up = plan == "runner-up"


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
    max_paths = rt.generator.backend.max_paths
    tok = rt.generator.tokenizer
    prompts = [tok.encode_prompt(p) for p in read_prompts(args.prompts, limit=args.limit)]
    vanilla = [rt.generate(ids, max_new_tokens=args.max_new_tokens, medusa=False).token_ids for ids in prompts]
    for ids in prompts[:4]:  # warm-up: both graphs, step costs and rates measured before anything is timed
        for plan in PLANS:
            set_plan(rt, plan, max_paths)
            rt.generate(ids, max_new_tokens=args.max_new_tokens)
    totals = {p: {"tokens": 0, "seconds": 0.0, "steps": 0, "identical": 0, "answers": 0} for p in PLANS}
    for r in range(args.rounds):
        for i, ids in enumerate(prompts):
            k = (i + r) % len(PLANS)
            for plan in PLANS[k:] + PLANS[:k]:
                set_plan(rt, plan, max_paths)
                t0 = time.perf_counter()
                res = rt.generate(ids, max_new_tokens=args.max_new_tokens)
                t = totals[plan]
                t["seconds"] += time.perf_counter() - t0
                t["tokens"] += res.new_tokens
                t["steps"] += res.steps
                t["identical"] += res.token_ids == vanilla[i]
                t["answers"] += 1
    set_plan(rt, "runner-up", max_paths)
    rows = {p: {"tokens_per_s": round(t["tokens"] / t["seconds"], 1),
                "tokens_per_step": round(t["tokens"] / max(t["steps"], 1), 3),
                "identical": f"{t['identical']}/{t['answers']}"} for p, t in totals.items()}
    result = {"artifact": args.artifact, "prompts": args.prompts, "limit": args.limit, "rounds": args.rounds,
              "max_new_tokens": args.max_new_tokens, "threads": args.threads, "machine": machine_info(), "plans": rows}
    print(json.dumps(rows, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
