"""One-token step time of two artifacts side by side: their vanilla graphs alternate in blocks of steps in one
process after the same random prompt, so both see the same machine state, each first in every other block (the
one run first in a block ran about 2 % slower; with the order alternating, one artifact given twice reads within
0.2 %); p10 / p50 per artifact. Two pasts (``--past 256 1900``) set one per artifact: give one artifact twice to measure its step's growth with
the past.

    python scripts/ab_step.py artifacts/a artifacts/b [--past 256 [1900]] [--blocks 12] [--steps 40] [--threads 2]

The first 5 steps of each block are not counted (the other session's thread pool may still be spinning).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from medusa_export.runtime.api import MedusaRuntime
from script_io import run_main  # noqa: E402

WARMUP = 5


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs=2)
    ap.add_argument("--past", type=int, nargs="+", default=[256])
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    runtimes = [MedusaRuntime.load(a, threads=args.threads) for a in args.artifacts]
    pasts = (args.past * 2)[:2]
    prompt = np.random.default_rng(0).integers(0, runtimes[0].manifest.dims.vocab_size, max(pasts))
    sessions = []
    for rt, past in zip(runtimes, pasts):
        s = rt.generator.backend.new_session()
        s.run(prompt[:past], np.arange(past), np.tri(past, dtype=bool), False, 1.0)
        s.keep(np.arange(past))
        sessions.append(s)
    times: list[list[float]] = [[], []]
    token, mask = np.array([5]), np.ones((1, 1), bool)
    for block in range(args.blocks):
        for k in (0, 1) if block % 2 == 0 else (1, 0):  # each first in every other block
            s = sessions[k]
            position = np.array([pasts[k]])
            for i in range(WARMUP + args.steps):
                t0 = time.perf_counter()
                s.run(token, position, mask, False, 1.0)  # not kept: every step at the same past
                if i >= WARMUP:
                    times[k].append((time.perf_counter() - t0) * 1e3)
    for s, rt in zip(sessions, runtimes):
        s.close()
        rt.close()
    rows = enumerate(zip(args.artifacts, pasts, times))
    print(json.dumps({f"{'AB'[k]}: {a} @ {past}": {"steps": len(t), "p10_ms": round(float(np.percentile(t, 10)), 3),
                                                   "p50_ms": round(float(np.median(t)), 3)} for k, (a, past, t) in rows}))


if __name__ == "__main__":
    run_main(main)
