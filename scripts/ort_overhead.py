"""Host time of single-stream decoding on ONNX Runtime: what greedy vanilla `generate` spends outside
`run_with_iobinding` (the decode loop, acceptance, streaming text, bindings, outputs), per token, next to the same
for a bare IOBinding loop that feeds the same graph the same shared KV buffers and reads only the next token id.
Measured directly (wall time minus time inside the engine), so the engine's own run-to-run noise cancels out.

    python scripts/ort_overhead.py artifacts/smollm2 [--tokens 128] [--repeats 5] [--threads 2] [--json out.json]
        [--speculate --prompts question.jsonl --limit 16] [--batched 8]

``--speculate``: a third row, greedy speculative decoding as `generate` runs it (heads and drafts as the runtime
chooses) on each prompt of ``--prompts``, not capped by ``ignore_eos``; its host time covers planning the drafts,
acceptance and the statistics too. The bare loop has no counterpart there.

``--batched N``: two more rows, the prompts of ``--prompts`` through the batched engine (`generate_many`, N in
flight), plain and speculating; their host time is the engine's Python around each lanes step (scheduling, drafts,
acceptance, bindings, streaming text), per generated token, over all sequences.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort

from medusa_export.runtime.api import MedusaRuntime
from medusa_export.runtime.backends.ort_outputs import first_outputs
from medusa_export.runtime.decode import GenerationConfig
from medusa_export.runtime.machine import machine_info
from medusa_export.runtime.prompts import read_prompts
from script_io import positive, run_main, writable, write_json  # noqa: E402

PROMPT = "Compose an engaging travel blog post about a recent trip to Hawaii."


class EngineClock:
    """Seconds spent inside `InferenceSession.run_with_iobinding` since the last `reset`."""

    def __init__(self) -> None:
        self.seconds = 0.0
        run = ort.InferenceSession.run_with_iobinding

        def timed(session, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return run(session, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        ort.InferenceSession.run_with_iobinding = timed

    def reset(self) -> None:
        self.seconds = 0.0


def through_runtime(gen, prompt_ids: list[int], tokens: int, clock: EngineClock,
                    speculate: bool = False) -> tuple[float, float]:
    """(host, engine) seconds per generated token through `Generator.generate`, prefill included."""
    clock.reset()
    t0 = time.perf_counter()
    out = gen.generate(prompt_ids, GenerationConfig(max_new_tokens=tokens, medusa=speculate, ignore_eos=not speculate))
    wall = time.perf_counter() - t0
    return (wall - clock.seconds) / out.new_tokens, clock.seconds / out.new_tokens


def speculating(gen, prompts: list[list[int]], tokens: int, clock: EngineClock) -> tuple[float, float]:
    """(host, engine) seconds per generated token of greedy speculative decoding over ``prompts``."""
    runs = [through_runtime(gen, p, tokens, clock, speculate=True) for p in prompts]
    return tuple(float(np.mean(v)) for v in zip(*runs))


def batched(rt, prompts: list[list[int]], tokens: int, clock: EngineClock, in_flight: int,
            speculate: bool) -> tuple[float, float]:
    """(host, engine) seconds per generated token of ``prompts`` through the batched engine, ``in_flight`` at once."""
    clock.reset()
    t0 = time.perf_counter()
    outs = rt.generate_many(prompts, max_num_seqs=in_flight, max_new_tokens=tokens, medusa=speculate)
    wall = time.perf_counter() - t0
    n = sum(o.new_tokens for o in outs)
    return (wall - clock.seconds) / n, clock.seconds / n


def bare_loop(backend, prompt_ids: list[int], tokens: int, clock: EngineClock) -> tuple[float, float]:
    """The same for a bare loop: bind the token, its position and mask, run, read the top id."""
    clock.reset()
    t0 = time.perf_counter()
    s = backend.new_session()
    n = len(prompt_ids)
    out = s.run(np.asarray(prompt_ids, np.int64), np.arange(n), np.tri(n, dtype=bool), False, 1.0,
                out_rows=np.array([n - 1]))
    s.keep(np.arange(n))
    token = int(out.next_ids[-1, 0])
    b, graph = s.bindings["vanilla"], s.graphs["vanilla"]
    if backend.selects_rows.get("vanilla"):
        b.bind_cpu_input("output_rows", np.zeros(1, np.int64))
    for name in s.reduced["vanilla"]:  # once: after the first step their one-row shapes stay bound
        b.bind_output(name, "cpu")
    for _ in range(tokens - 1):
        past = s.kv.length
        b.bind_cpu_input("input_ids", np.array([[token]], np.int64))
        b.bind_cpu_input("position_ids", np.array([[past]], np.int64))
        b.bind_cpu_input("attention_mask", np.ones((1, 1, 1, past + 1), bool))
        graph.run_with_iobinding(b)
        token = int(first_outputs(b, 1)[0][0, 0, 0])
        s.kv.length += 1  # commit the row GroupQueryAttention wrote in place
    s.close()
    wall = time.perf_counter() - t0
    return (wall - clock.seconds) / tokens, clock.seconds / tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=writable, default=None)
    ap.add_argument("--speculate", action="store_true", help="also greedy speculative decoding on --prompts")
    ap.add_argument("--prompts", default=None, help="JSONL prompts for --speculate (default: the packaged set)")
    ap.add_argument("--limit", type=positive, default=16)
    ap.add_argument("--batched", type=int, default=0, help="also the batched engine, this many in flight, on --prompts")
    args = ap.parse_args()
    clock = EngineClock()
    rt = MedusaRuntime.load(args.artifact, backend="ort", threads=args.threads)
    gen = rt.generator
    prompt_ids = gen.tokenizer.encode_prompt(PROMPT)
    through_runtime(gen, prompt_ids, 16, clock), bare_loop(gen.backend, prompt_ids, 16, clock)  # warm-up
    runs = {"runtime": [], "bare": []}
    chats = [gen.tokenizer.encode_prompt(p) for p in read_prompts(args.prompts, limit=args.limit)] \
        if args.speculate or args.batched else []
    if args.speculate:
        runs["speculating"] = []
        speculating(gen, chats[:2], 16, clock)  # warm-up: both graphs, drafts
    if args.batched:
        runs["batched"], runs["batched_speculating"] = [], []
        batched(rt, chats[:args.batched], 16, clock, args.batched, True)  # warm-up: the lanes graph
    for _ in range(args.repeats):
        runs["runtime"].append(through_runtime(gen, prompt_ids, args.tokens, clock))
        runs["bare"].append(bare_loop(gen.backend, prompt_ids, args.tokens, clock))
        if args.speculate:
            runs["speculating"].append(speculating(gen, chats, args.tokens, clock))
        if args.batched:
            runs["batched"].append(batched(rt, chats, args.tokens, clock, args.batched, False))
            runs["batched_speculating"].append(batched(rt, chats, args.tokens, clock, args.batched, True))
    report = {"artifact": args.artifact, "tokens": args.tokens, "repeats": args.repeats, "threads": args.threads,
              "prompts": args.prompts if chats else None, "limit": args.limit if chats else None,
              "in_flight": args.batched or None}
    for name, values in runs.items():
        host, engine = (float(np.median(v)) * 1e3 for v in zip(*values))
        report[name] = {"host_ms_per_token_p50": round(host, 3), "engine_ms_per_token_p50": round(engine, 3),
                        "host_share": round(host / (host + engine), 4)}
    report["machine"] = machine_info()  # before printing: report_default.sh keeps what is printed as the result
    print(json.dumps(report))
    if args.json:
        write_json(args.json, report, indent=1)


if __name__ == "__main__":
    run_main(main)
