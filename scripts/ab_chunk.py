"""Lanes steps under two builds of the kernel library, side by side in one process: the library compiled from an
older source (``--old-source``, e.g. ``git show REV:runtime/kernels/row_attention.c > old.c``) and the current one,
on the same artifact, in alternating blocks. Each case is a step of ``D`` decoding sequences (one new token each,
past 300) beside a prompt chunk of ``R`` rows in another lane (R 0: none).

    python scripts/ab_chunk.py artifacts/int8-rows --old-source old.c [--blocks 8] [--json ab_chunk.json]

Prints and writes the median milliseconds per case and library.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_pages import fill  # noqa: E402

from medusa_export.runtime import kernels  # noqa: E402
from medusa_export.runtime.api import MedusaRuntime  # noqa: E402
from medusa_export.runtime.artifact_files import artifact_dir  # noqa: E402
from medusa_export.runtime.backends.lanes import Lane  # noqa: E402
from medusa_export.runtime.machine import machine_info  # noqa: E402
from script_io import run_main, writable, write_json  # noqa: E402

CASES = [(0, 7), (0, 8), (16, 7), (64, 7), (128, 0)]  # (prompt rows, decoding sequences)
REPEATS, SKIPPED = 6, 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--old-source", required=True)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=writable, default=None)
    args = ap.parse_args()
    if not Path(args.old_source).is_file():  # before the compiler fails on it with a traceback
        raise FileNotFoundError(f"--old-source {args.old_source} does not exist: give the kernel source to compare")
    artifact_dir(args.artifact)
    current = kernels.library_path()
    with tempfile.TemporaryDirectory() as tmp:
        old = str(Path(tmp) / "old_kernel.so")
        subprocess.run([*kernels._compiler(), *kernels.FLAGS, "-o", old, args.old_source, *kernels.LIBS], check=True)
        state, rng = {}, np.random.default_rng(0)
        for name, path in (("old", old), ("new", current)):
            kernels.library_path = lambda p=path: p  # the library the next load registers
            backend = MedusaRuntime.load(args.artifact, threads=args.threads).generator.backend
            sessions = [backend.new_session() for _ in range(8)]
            for i, s in enumerate(sessions[:7]):
                fill(backend.lanes, rng, i, s, 300, 100)
            state[name] = (backend.lanes, sessions)
        times = {name: {str(c): [] for c in CASES} for name in state}
        for block in range(args.blocks):
            for name in ("old", "new") if block % 2 == 0 else ("new", "old"):
                lanes, sessions = state[name]
                for rows, decoding in CASES:
                    for _ in range(REPEATS):
                        step = [Lane(s, rng.integers(100, 5000, 1), 1.0) for s in sessions[:decoding]]
                        step += [None] * (8 - decoding)
                        if rows:
                            step[7] = Lane(sessions[7], rng.integers(100, 5000, rows), 1.0, 1)
                        t0 = time.perf_counter()
                        lanes.run(step)
                        times[name][str((rows, decoding))].append(time.perf_counter() - t0)
                        for s in sessions[:decoding]:
                            lanes.keep(s, np.arange(0))  # nothing kept: every step sees the same past
    medians = {name: {case: round(float(np.median(v[SKIPPED:])) * 1e3, 2) for case, v in t.items()}
               for name, t in times.items()}
    print(json.dumps(medians))
    if args.json:
        write_json(args.json, {"machine": machine_info(), "args": vars(args), "cases": "(prompt rows, decoding sequences)",
                               "median_ms": medians}, indent=1)


if __name__ == "__main__":
    run_main(main)
