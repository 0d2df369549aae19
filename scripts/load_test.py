"""Load benchmark of `medusa-export serve` (not a test): requests/s, output tokens/s, time to first token and
inter-token latency (p50/p99), errors, at several concurrency levels, Medusa on vs off, for each
``--max-num-seqs`` (requests the server decodes together).

    python scripts/load_test.py ARTIFACT [--max-num-seqs 1 8] [--concurrency 1 2 4 8] [--requests 16]
                                [--max-tokens 64] [--prompts question.jsonl] [--json out.json]

Each setting gets its own server, started with the project's command on 127.0.0.1 and stopped after.
Streaming chat completions (greedy, ``ignore_eos`` so every answer has ``--max-tokens`` tokens) through the
official `openai` client; each level sends ``--requests`` requests with at most ``concurrency`` in flight (below
the admission limits, so errors must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from medusa_export.runtime.machine import machine_info
from medusa_export.runtime.prompts import read_prompts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from script_io import free_port, positive, run_main, start_served, write_json  # noqa: E402


def start_server(artifact: str, max_num_seqs: int, max_queue: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "medusa_export.runtime.cli", "serve", artifact, "--port", str(port),
           "--max-num-seqs", str(max_num_seqs), "--max-queue", str(max_queue)]
    return start_served(cmd, port, artifact), f"http://127.0.0.1:{port}"


async def one(client, model: str, prompt: str, max_tokens: int, medusa: bool) -> dict:
    t0 = time.perf_counter()
    first, stamps, tokens = None, [], 0
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"medusa": medusa, "ignore_eos": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or now
                stamps.append(now)
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    except Exception as e:  # noqa: BLE001 - counted as an error
        return {"error": f"{type(e).__name__}: {e}"[:200]}
    gaps = np.diff(stamps).tolist()
    # A chunk carries one verification step's tokens: spread each gap over the tokens per chunk.
    per_chunk = max(1.0, (tokens - 1) / (len(stamps) - 1)) if len(stamps) > 1 else 1.0
    per_token = [g / per_chunk for g in gaps]
    return {"ttft_s": (first or time.perf_counter()) - t0, "e2e_s": time.perf_counter() - t0, "tokens": tokens,
            "itl_s": per_token}


async def level(base: str, prompts: list[str], concurrency: int, n: int, max_tokens: int, medusa: bool) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    try:
        model = (await client.models.list()).data[0].id

        async def bounded(i: int) -> dict:
            async with gate:
                return await one(client, model, prompts[i % len(prompts)], max_tokens, medusa)

        t0 = time.perf_counter()
        rows = await asyncio.gather(*(bounded(i) for i in range(n)))
        wall = time.perf_counter() - t0
    finally:
        await client.close()  # on this loop: closed after asyncio.run ends, its connections raised "loop is closed"
    ok = [r for r in rows if "error" not in r]
    pct = lambda xs, q: round(float(np.percentile(xs, q)) * 1e3, 1) if xs else None  # noqa: E731
    ttft, itl = [r["ttft_s"] for r in ok], [g for r in ok for g in r["itl_s"]]
    return {"concurrency": concurrency, "medusa": medusa, "requests": n, "errors": n - len(ok),
            "requests_per_s": round(len(ok) / wall, 3), "output_tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 2),
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99), "itl_ms_p50": pct(itl, 50),
            "itl_ms_p99": pct(itl, 99), "error_samples": [r["error"] for r in rows if "error" in r][:3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--max-num-seqs", type=positive, nargs="+", default=[1, 8])
    ap.add_argument("--concurrency", type=positive, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--requests", type=positive, default=16)
    ap.add_argument("--max-tokens", type=positive, default=64)
    ap.add_argument("--prompts", type=Path, default=None, help="JSONL prompts (default: the packaged set)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not Path(args.artifact, "manifest.json").is_file():
        ap.error(f"{args.artifact} is not an artifact directory (no manifest.json): build one with medusa-export build")
    prompts = read_prompts(args.prompts)
    report = {"artifact": args.artifact, "machine": machine_info(), "max_tokens": args.max_tokens, "rows": []}
    for seqs in args.max_num_seqs:
        proc, base = start_server(args.artifact, seqs, max_queue=max(args.concurrency))
        try:
            for medusa in (True, False):
                for c in args.concurrency:
                    row = {"max_num_seqs": seqs, **asyncio.run(level(base, prompts, c, args.requests,
                                                                       args.max_tokens, medusa))}
                    report["rows"].append(row)
                    print(json.dumps(row), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    run_main(main)
