"""Step latency of artifacts on ONNX Runtime: how a step grows with the tree size (T) and with the past, and
what share of a T=1 step the matrix multiplications take (an ONNX Runtime profile).

    python scripts/step_latency.py ARTIFACT [ARTIFACT ...] [--threads 2] [--json out.json]

Each artifact's vanilla graph (T=1) and Medusa graph (T = 2, 4, 8, 16 tree nodes + root) run on random tokens
after a past of 256; the vanilla graph also at past 2,000 (if the artifact's max_seq allows). One artifact at a
time, so the ONNX Runtime thread pools of different sessions never compete.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from medusa_export.runtime import kernels
from medusa_export.runtime.api import MedusaRuntime
from medusa_export.runtime.backends.ort_outputs import selects_rows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from script_io import positive, run_main, with_machine, writable, write_json  # noqa: E402

MATMULS = ("MatMul", "MatMulNBits", "MatMulInteger", "Gemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")


def _chain_mask(t: int) -> tuple[np.ndarray, np.ndarray]:
    return np.tri(t, dtype=bool), np.arange(t)


def time_step(backend, t: int, past: int, medusa: bool, runs: int) -> float:
    """Median ms of a step of T tokens after ``past`` committed ones (the KV is refilled to ``past`` each time)."""
    rng = np.random.default_rng(0)
    with backend.new_session(past + t + 1) as s:
        ids = rng.integers(0, backend.dims.vocab_size, past)
        s.run(ids, np.arange(past), np.tri(past, dtype=bool), False, 1.0)
        s.keep(np.arange(past))
        mask, depth = _chain_mask(t)
        toks = rng.integers(0, backend.dims.vocab_size, t)
        times = []
        for _ in range(runs + 3):
            t0 = time.perf_counter()
            s.run(toks, past + depth, mask, medusa, 1.0)
            times.append(time.perf_counter() - t0)
            s.kv.staged = 0  # nothing kept: the next run writes the same rows again
    return round(float(np.median(times[3:])) * 1e3, 2)


def matmul_share(directory: Path, threads: int, past: int = 256) -> dict:
    """Profile T=1 vanilla steps: the share of kernel time in matrix multiplications."""
    import onnxruntime as ort

    rt = MedusaRuntime.load(directory, backend="ort", threads=threads)
    backend = rt.generator.backend
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "prof")
        opts.log_severity_level = 3
        kernels.register(opts, rt.manifest.attention)  # graphs built with --attention kernel use its ops
        path = directory / rt.manifest.graphs["vanilla"].file
        backend.sessions["vanilla"] = session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        backend.selects_rows["vanilla"] = selects_rows(session)
        time_step(backend, 1, past, False, 20)
        trace = json.loads(Path(backend.sessions["vanilla"].end_profiling()).read_text())
    model_runs = sorted((ev["ts"], ev["ts"] + ev["dur"]) for ev in trace
                        if ev.get("cat") == "Session" and ev["name"] == "model_run")
    after_prefill = model_runs[0][1]  # the first run is the 256-token prefill: not a T=1 step
    runs = len(model_runs) - 1
    per_op, tail = defaultdict(float), 0.0
    for ev in trace:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time") and ev["ts"] >= after_prefill:
            per_op[ev["args"]["op_name"]] += ev["dur"]
            if ev["name"].startswith("tail/") and "lm_head" not in ev["name"]:  # the traced vocabulary reduction
                tail += ev["dur"]
    total = sum(per_op.values())
    mm = sum(v for k, v in per_op.items() if k in MATMULS)
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:6]
    return {"kernel_ms_per_step": round(total / 1e3 / max(runs, 1), 2), "matmul_share": round(mm / total, 3),
            "outside_matmuls_share": round(1 - mm / total, 3),
            "top_ops_ms_per_step": {k: round(v / 1e3 / max(runs, 1), 2) for k, v in top},
            "reduction_tail_ms_per_step": round(tail / 1e3 / max(runs, 1), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--runs", type=positive, default=30)
    ap.add_argument("--json", type=writable)
    args = ap.parse_args()
    report = {}
    for d in args.artifacts:
        rt = MedusaRuntime.load(d, backend="ort", threads=args.threads)
        b, m = rt.generator.backend, rt.manifest
        row = {"graph_format": m.graph_format, "weights": m.weights,
               "vanilla_t1_past256_ms": time_step(b, 1, 256, False, args.runs)}
        if m.max_seq > 2010:
            row["vanilla_t1_past2000_ms"] = time_step(b, 1, 2000, False, args.runs)
        row["medusa_ms_by_T_past256"] = {t: time_step(b, t, 256, True, args.runs) for t in (1, 2, 4, 8, 16)}
        rt.close()
        row["profile_t1"] = matmul_share(d, args.threads)
        report[str(d)] = row
        print(d, json.dumps(row))
    if args.json:
        write_json(args.json, with_machine(report))


if __name__ == "__main__":
    run_main(main)
