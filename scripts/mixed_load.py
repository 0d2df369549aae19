"""Mixed load on the batched engine (a benchmark, not a test): seven streams decode, then a long prompt arrives.
How long do the running streams wait between tokens while it is prefilled, with chunked prefill
(``--max-num-batched-tokens``) against one chunk of the whole prompt?

    python scripts/mixed_load.py ARTIFACT [--prompt-tokens 1200] [--budgets 64 256 4096] [--json out.json]

For each budget: the streams' inter-token gaps (p50, max) before and while the long prompt goes in, the number
of steps its prefill took, and whether every answer equals its answer alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from medusa_export.runtime.api import MedusaRuntime
from medusa_export.runtime.decode import GenerationConfig
from medusa_export.runtime.engine import Engine
from medusa_export.runtime.generator import GenerationResult
from medusa_export.runtime.machine import machine_info
from medusa_export.runtime.prompts import read_prompts
from medusa_export.runtime.warm_up import warm_up_backend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from script_io import positive, run_main, write_json  # noqa: E402


def run(rt, prompts: list[list[int]], long_prompt: list[int], budget: int, streams: int) -> dict:
    cfg = GenerationConfig(max_new_tokens=96, medusa=False, ignore_eos=True)
    stamps: dict[int, list[float]] = {i: [] for i in range(streams)}
    finals: dict[int, GenerationResult] = {}
    engine = Engine(rt.generator, streams + 1, budget)

    def sink(i):
        def take(item):
            if isinstance(item, GenerationResult):
                finals[i] = item
            elif i < streams:
                stamps[i].append(time.perf_counter())
        return take

    for i in range(streams):
        engine.add(prompts[i], cfg, sink(i))
    for _ in range(20):  # the streams are decoding
        engine.step()
    arrived = time.perf_counter()
    long_seq = engine.add(long_prompt, GenerationConfig(max_new_tokens=4, medusa=False, ignore_eos=True), sink(streams))
    prefill_steps = 0
    while long_seq.cursor is None and prefill_steps < 10_000:  # bounded
        engine.step()
        prefill_steps += 1
    prefilled = time.perf_counter()
    while engine.step():
        pass
    before, during = [], []
    for ts in stamps.values():
        for a, b in zip(ts, ts[1:]):
            (during if arrived <= b <= prefilled + 1e-3 else before if b < arrived else []).append(b - a)
    ms = lambda xs, q: round(float(np.percentile(xs, q)) * 1e3, 1) if xs else None  # noqa: E731
    alone = [rt.generator.generate(p, cfg).token_ids for p in prompts[:streams]]
    return {"max_num_batched_tokens": budget, "long_prompt_tokens": len(long_prompt), "prefill_steps": prefill_steps,
            "gap_ms_p50_before": ms(before, 50), "gap_ms_max_before": ms(before, 100),
            "gap_ms_p50_during": ms(during, 50), "gap_ms_max_during": ms(during, 100),
            "identical_to_alone": all(finals[i].token_ids == alone[i] for i in range(streams))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--prompt-tokens", type=positive, default=1200)
    ap.add_argument("--budgets", type=positive, nargs="+", default=[64, 256, 4096])
    ap.add_argument("--streams", type=positive, default=7)
    ap.add_argument("--threads", type=positive, default=None)
    ap.add_argument("--prompts", type=Path, default=None, help="JSONL prompts (default: the packaged set)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    rt = MedusaRuntime.load(a.artifact, threads=a.threads)
    tok = rt.generator.tokenizer
    texts = read_prompts(a.prompts)
    if len(texts) < a.streams:
        ap.error(f"--streams {a.streams}: the prompts file has only {len(texts)} prompts")
    prompts = [tok.encode_prompt(t) for t in texts[: a.streams]]
    # Warm-up: every graph opens and runs once before the first budget's row, not inside it.
    rt.generate(prompts[0], max_new_tokens=8, medusa=False)
    warm_up_backend(rt.generator)
    long_text = " ".join(texts)
    long_prompt = tok.encode_prompt(long_text)[: a.prompt_tokens]
    rows = []
    for budget in a.budgets:
        row = run(rt, prompts, long_prompt, budget, a.streams)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        write_json(a.json, {"artifact": a.artifact, "machine": machine_info(), "rows": rows})


if __name__ == "__main__":
    run_main(main)
