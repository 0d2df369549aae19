"""Where a batched (lanes) step's time goes: ONNX Runtime's per-operator times over steady decode steps of N
sequences holding ``--past`` tokens each (one new token per sequence per step).

    python scripts/lanes_profile.py artifacts/smollm2 artifacts/smollm2-kernel [--past 300] [--sequences 8] \\
        [--steps 40] [--json lanes_profile.json]

Per artifact: the median wall time of a step and, for the last 30 steps, the mean milliseconds per step and calls
per step of each operator type (ONNX Runtime's profiler, `enable_profiling`). Artifacts run one after the other
in one process.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_pages import fill  # noqa: E402

from medusa_export.runtime.api import MedusaRuntime  # noqa: E402
from medusa_export.runtime.backends.lanes import Lane  # noqa: E402
from medusa_export.runtime.machine import machine_info  # noqa: E402
from script_io import run_main, writable, write_json  # noqa: E402

COUNTED = 30


def profile(artifact: str, past: int, sequences: int, steps: int, threads: int, prefix: str) -> dict:
    rt = MedusaRuntime.load(artifact, threads=threads)
    backend = rt.generator.backend
    backend.opts.enable_profiling = True  # before the lanes graph opens (it opens at its first use, below)
    backend.opts.profile_file_prefix = prefix
    lanes = backend.lanes
    sessions = [backend.new_session() for _ in range(sequences)]
    rng = np.random.default_rng(0)
    for i, s in enumerate(sessions):  # the past, in chunks of 100 rows, one sequence at a time
        fill(lanes, rng, i, s, past, chunk=100)
    wall = []
    for _ in range(steps):
        t0 = time.perf_counter()
        lanes.run([Lane(s, rng.integers(100, 5000, 1), 1.0) for s in sessions] + [None] * (lanes.lanes - sequences))
        wall.append(time.perf_counter() - t0)
        for s in sessions:
            lanes.keep(s, np.arange(1))
    trace = lanes.session.end_profiling()
    events = json.load(open(trace))
    os.remove(trace)
    runs = [e for e in events if e.get("name") == "model_run"][-COUNTED:]
    ms, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= runs[0]["ts"]:
            ms[e["args"]["op_name"]] += e["dur"] / 1e3 / len(runs)
            calls[e["args"]["op_name"]] += 1 / len(runs)
    return {"artifact": artifact, "attention": rt.manifest.attention, "median_step_ms": round(float(np.median(wall)) * 1e3, 2),
            "profiled_step_ms": round(sum(r["dur"] for r in runs) / len(runs) / 1e3, 2),
            "operators": {op: {"ms_per_step": round(v, 2), "calls_per_step": round(calls[op])} for op, v in ms.most_common()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--past", type=int, default=300)
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=writable, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [profile(a, args.past, args.sequences, args.steps, args.threads, os.path.join(tmp, "lanes"))
                for a in args.artifacts]
    for row in rows:
        top = ", ".join(f"{op} {v['ms_per_step']} ms ({v['calls_per_step']} calls)"
                        for op, v in list(row["operators"].items())[:4])
        print(f"{row['artifact']} ({row['attention']}): step {row['median_step_ms']} ms; {top}")
    if args.json:
        write_json(args.json, {"machine": machine_info(), "past": args.past, "sequences": args.sequences,
                               "rows": rows}, indent=1)


if __name__ == "__main__":
    run_main(main)
