"""One-token step time of two artifacts side by side: their vanilla graphs alternate in blocks of steps in one
process after the same random prompt, so both see the same machine state; p10 / p50 per artifact.

    python scripts/ab_step.py artifacts/a artifacts/b [--past 256] [--blocks 12] [--steps 40] [--threads 2]

The first 5 steps of each block are not counted (the other session's thread pool may still be spinning).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from medusa_export.runtime.api import MedusaRuntime

WARMUP = 5


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs=2)
    ap.add_argument("--past", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    runtimes = [MedusaRuntime.load(a, threads=args.threads) for a in args.artifacts]
    prompt = np.random.default_rng(0).integers(0, runtimes[0].manifest.dims.vocab_size, args.past)
    sessions = []
    for rt in runtimes:
        s = rt.generator.backend.new_session()
        s.run(prompt, np.arange(args.past), np.tri(args.past, dtype=bool), False, 1.0)
        s.keep(np.arange(args.past))
        sessions.append(s)
    times: list[list[float]] = [[], []]
    token, position, mask = np.array([5]), np.array([args.past]), np.ones((1, 1), bool)
    for _ in range(args.blocks):
        for k, s in enumerate(sessions):
            for i in range(WARMUP + args.steps):
                t0 = time.perf_counter()
                s.run(token, position, mask, False, 1.0)  # not kept: every step at the same past
                if i >= WARMUP:
                    times[k].append((time.perf_counter() - t0) * 1e3)
    for s, rt in zip(sessions, runtimes):
        s.close()
        rt.close()
    print(json.dumps({a: {"steps": len(t), "p10_ms": round(float(np.percentile(t, 10)), 3),
                          "p50_ms": round(float(np.median(t)), 3)} for a, t in zip(args.artifacts, times)}))


if __name__ == "__main__":
    main()
