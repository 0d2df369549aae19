"""What the KV stores' memory pages cost: the runtime's small-page stores against plain ``np.zeros`` (which numpy
puts on transparent huge pages from 4 MiB), each measured in fresh processes, the two kinds alternating.

Per process: the first and second one-token `generate` (a new KV store each), the first and second lanes step over
eight new sessions (one row each), and the growth of resident memory from making the eight sessions to their
holding 256 tokens each.

Then, in one process, steady-state lanes steps over eight sessions of each kind holding ``--past`` tokens: blocks of
decode steps (one row per session), the kinds alternating, the first step of a block (it rebinds the KV buffers)
left out.

    python scripts/kv_pages.py artifacts/smollm2 [--runs 2] [--threads 2] [--past 300] [--json kv_pages.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

from medusa_export.runtime.backends.lanes import Lane
from script_io import run_main, writable, write_json  # noqa: E402

KINDS = ("numpy_zeros", "small_pages")


def numpy_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """The allocation KV stores had before: numpy's, on transparent huge pages from 4 MiB."""
    return np.zeros(shape, dtype)


def fill(lanes, rng, i: int, session, tokens: int, chunk: int) -> None:
    """``tokens`` random tokens into ``session``, in lane ``i`` alone, ``chunk`` rows per lanes step."""
    for start in range(0, tokens, chunk):
        step = [None] * lanes.lanes
        step[i] = Lane(session, rng.integers(100, 5000, min(chunk, tokens - start)), 1.0, 1)
        lanes.run(step)
        lanes.keep(session, np.arange(len(step[i].tokens)))


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


def measure(artifact: str, kind: str, threads: int) -> dict:
    """One process's figures (run in a child: page-fault costs depend on what the process touched before)."""
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.backends import slot_cache

    if kind == "numpy_zeros":
        slot_cache.small_page_zeros = numpy_zeros
    rt = MedusaRuntime.load(artifact, threads=threads)
    out = {"alloc": kind}
    for name in ("first_generate_ms", "second_generate_ms"):
        t0 = time.perf_counter()
        rt.generate("Write a short note about KV caches.", max_new_tokens=1)
        out[name] = round((time.perf_counter() - t0) * 1e3, 1)
    backend = rt.generator.backend
    lanes, sessions = backend.lanes, [backend.new_session() for _ in range(backend.lanes.lanes)]
    before = rss_mib()  # the sessions made, none of their KV memory touched yet
    rng = np.random.default_rng(0)
    for name in ("first_lanes_step_ms", "second_lanes_step_ms"):
        step = [Lane(s, rng.integers(100, 5000, 1), 1.0) for s in sessions]
        t0 = time.perf_counter()
        lanes.run(step)
        out[name] = round((time.perf_counter() - t0) * 1e3, 1)
        for s in sessions:
            lanes.keep(s, np.arange(1))
    for i, s in enumerate(sessions):  # 2 + 254 more tokens each
        fill(lanes, rng, i, s, 254, chunk=127)
    out.update(kv_reserved_mib=round(sum(s.kv_bytes for s in sessions) / 2**20),
               rss_growth_8x256_tokens_mib=round(rss_mib() - before))
    return out


def steady(artifact: str, threads: int, past: int, blocks: int = 10, steps: int = 6) -> dict:
    """Median ms of an 8-session decode step at ``past`` tokens, per kind of store; "small_pages_reused": small-page
    stores that held longer sequences before (a server's reused slots), so the steps fault in no new pages."""
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.backends import slot_cache

    rt = MedusaRuntime.load(artifact, threads=threads)
    backend, small = rt.generator.backend, slot_cache.small_page_zeros
    lanes, rng, sets = backend.lanes, np.random.default_rng(0), {}
    for kind in KINDS + ("small_pages_reused",):
        slot_cache.small_page_zeros = small if kind != "numpy_zeros" else numpy_zeros
        sets[kind] = [backend.new_session() for _ in range(lanes.lanes)]
        for i, session in enumerate(sets[kind]):
            if kind == "small_pages_reused":
                fill(lanes, rng, i, session, past + blocks * (steps + 1) + 32, chunk=100)
                session.reset()
            fill(lanes, rng, i, session, past, chunk=100)
    slot_cache.small_page_zeros = small
    times: dict[str, list[float]] = {kind: [] for kind in sets}
    for _ in range(blocks):
        for kind, sessions in sets.items():
            for k in range(steps + 1):
                t0 = time.perf_counter()
                lanes.run([Lane(s, rng.integers(100, 5000, 1), 1.0) for s in sessions])
                if k:
                    times[kind].append((time.perf_counter() - t0) * 1e3)
                for session in sessions:
                    lanes.keep(session, np.arange(1))
    return {kind: round(float(np.median(t)), 2) for kind, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--past", type=int, default=300)
    ap.add_argument("--json", type=writable, default=None)
    ap.add_argument("--child", choices=KINDS + ("steady",), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = steady(args.artifact, args.threads, args.past) if args.child == "steady" else \
            measure(args.artifact, args.child, args.threads)
        print(json.dumps(result))
        return
    from medusa_export.runtime.artifact_files import artifact_dir
    from medusa_export.runtime.machine import machine_info

    artifact_dir(args.artifact)  # a missing artifact: one line here, not a child's traceback
    rows = []
    for _ in range(args.runs):
        for kind in KINDS:
            done = subprocess.run([sys.executable, __file__, args.artifact, "--threads", str(args.threads),
                                   "--child", kind], capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    done = subprocess.run([sys.executable, __file__, args.artifact, "--threads", str(args.threads), "--past",
                           str(args.past), "--child", "steady"], capture_output=True, text=True, check=True)
    steady_ms = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps({"steady_8_lane_step_ms_p50": steady_ms, "past": args.past}), flush=True)
    if args.json:
        write_json(args.json, {"artifact": args.artifact, "threads": args.threads, "rows": rows, "past": args.past,
                               "steady_8_lane_step_ms_p50": steady_ms, "machine": machine_info()}, indent=1)


if __name__ == "__main__":
    run_main(main)
