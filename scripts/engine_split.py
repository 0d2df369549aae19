"""Where the batched engine's time goes at a given concurrency: per artifact and mode (vanilla, speculation), the
aggregate tokens/s, the seconds in lanes steps that decode only and in those that also take a prompt chunk, and the
mean rows and milliseconds of a decode-only step. The requests run as `compare_peers.py` runs ours (closed loop,
``--concurrency`` in flight, greedy, `peer_runners.run_ours`) on the first ``--limit`` prompts of a JSONL file.

    python scripts/engine_split.py artifacts/smollm2 artifacts/smollm2-kernel --prompts mt_bench.jsonl \\
        [--limit 16] [--concurrency 8] [--max-new-tokens 128] [--threads 2] [--json engine_split.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_runners import run_ours  # noqa: E402

from medusa_export.runtime.api import MedusaRuntime  # noqa: E402
from medusa_export.runtime.machine import machine_info  # noqa: E402
from medusa_export.runtime.prompts import read_prompts  # noqa: E402
from script_io import positive, run_main, writable, write_json  # noqa: E402


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
        runs = run_ours(rt, prompts, max_new, concurrency, medusa)
    finally:
        lanes.run = run
    wall = max(r.done for r in runs) - min(r.submitted for r in runs)
    return {"medusa": medusa, "tokens_per_s": round(sum(len(r.ids) for r in runs) / wall, 1), "wall_s": round(wall, 2),
            "decode_only_s": round(seconds["decode"], 2), "decode_only_steps": count["decode"],
            "decode_rows_per_step": round(rows["decode"] / max(count["decode"], 1), 2),
            "ms_per_decode_step": round(1e3 * seconds["decode"] / max(count["decode"], 1), 1),
            "with_chunk_s": round(seconds["chunk"], 2), "with_chunk_steps": count["chunk"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--limit", type=positive, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=writable, default=None)
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
        write_json(args.json, {"machine": machine_info(), "args": vars(args), "rows": rows}, indent=1)


if __name__ == "__main__":
    run_main(main)
