"""Where the batched engine's time goes at a given concurrency: per artifact and mode (vanilla, speculation), the
aggregate tokens/s, the number of steps, the seconds in lanes steps that decode only and in those that also take a
prompt chunk, and the mean rows and milliseconds of a decode-only step. Prompts are the first ``--limit`` of a JSONL
file (chat template applied), closed loop with ``--concurrency`` in flight, greedy.

    python scripts/engine_split.py artifacts/smollm2 artifacts/smollm2-kernel --prompts mt_bench.jsonl \\
        [--limit 16] [--concurrency 8] [--max-new-tokens 128] [--threads 2] [--json engine_split.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import time

from medusa_export.runtime.api import MedusaRuntime
from medusa_export.runtime.decode import GenerationConfig
from medusa_export.runtime.engine import Engine
from medusa_export.runtime.generator import GenerationResult
from medusa_export.runtime.machine import machine_info
from medusa_export.runtime.prompts import read_prompts


def split(rt, prompts: list[list[int]], concurrency: int, max_new: int, medusa: bool) -> dict:
    lanes = rt.generator.backend.lanes
    run, seconds, count, rows = lanes.run, collections.Counter(), collections.Counter(), collections.Counter()

    def timed(step):  # the lanes step, timed, by kind
        t0 = time.perf_counter()
        out = run(step)
        kind = "chunk" if any(lane is not None and lane.outputs is not None for lane in step) else "decode"
        seconds[kind] += time.perf_counter() - t0
        count[kind] += 1
        rows[kind] += sum(len(lane.tokens) for lane in step if lane)
        return out

    lanes.run = timed
    try:
        engine, done, pending = Engine(rt.generator, concurrency), {}, list(range(len(prompts)))
        cfg = GenerationConfig(max_new_tokens=max_new, temperature=0.0, medusa=medusa)
        steps, t0 = 0, time.perf_counter()
        while pending or not engine.idle:
            while pending and len(engine.running) + len(engine.waiting) < concurrency:
                i = pending.pop(0)
                engine.add(prompts[i], cfg, lambda x, i=i: done.__setitem__(i, x) if isinstance(x, GenerationResult)
                           else None)
            engine.step()
            steps += 1
        wall = time.perf_counter() - t0
    finally:
        lanes.run = run
    tokens = sum(len(r.token_ids) for r in done.values())
    return {"medusa": medusa, "tokens_per_s": round(tokens / wall, 1), "wall_s": round(wall, 2), "steps": steps,
            "decode_only_s": round(seconds["decode"], 2), "decode_only_steps": count["decode"],
            "decode_rows_per_step": round(rows["decode"] / max(count["decode"], 1), 2),
            "ms_per_decode_step": round(1e3 * seconds["decode"] / max(count["decode"], 1), 1),
            "with_chunk_s": round(seconds["chunk"], 2), "with_chunk_steps": count["chunk"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    texts, rows = read_prompts(args.prompts)[: args.limit], []
    for artifact in args.artifacts:
        rt = MedusaRuntime.load(artifact, threads=args.threads)
        prompts = [rt.generator.tokenizer.encode_prompt(t) for t in texts]
        for medusa in (False, True):
            row = {"artifact": artifact, "attention": rt.manifest.attention,
                   **split(rt, prompts, args.concurrency, args.max_new_tokens, medusa)}
            print(json.dumps(row))
            rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_info(), "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
