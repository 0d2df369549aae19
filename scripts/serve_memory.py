"""Resident memory of `medusa-export serve` under repeated load (a measurement, not a test): does a long-running
server leak? Starts the server with the project's command on 127.0.0.1, sends rounds of mixed requests (chat and
completions, greedy and sampled, streamed and not, several prompt lengths and ``max_tokens``, some streams closed
mid-answer, some bad requests), and records the server's VmRSS after each round, once it is idle.

    python scripts/serve_memory.py ARTIFACT [--rounds 8] [--requests 40] [--concurrency 10] [--threads 2]
                                   [--env MALLOC_ARENA_MAX=2] [--probe] [--trim] [--trace 0]
                                   [--ort enable_mem_pattern=1] [--out-dir DIR] [--json out.json]

``--env`` sets variables in the server's environment (glibc's ``MALLOC_ARENA_MAX``, ``MALLOC_TRIM_THRESHOLD_``).
``--probe`` runs the server's CLI in a wrapper with a control thread (on a FIFO) that reports after each round what
Python holds (objects by type after a full collection, `tracemalloc` with ``--trace N`` frames, its snapshots
written beside the report) and what glibc's malloc holds (in use, free but kept); ``--trim`` then also calls
``malloc_trim(0)`` after each round and records VmRSS before and after: the difference is memory freed but not yet
returned to the system, not a leak. ``--ort NAME=0|1,...`` sets ONNX Runtime session options on every graph the
server opens (``enable_mem_pattern``, ``enable_cpu_mem_arena``), to weigh what the backend's settings hold. Each
round's request mix is drawn from the round's number, so runs of different settings see the same requests; with
the resident memory by mapping (weights.bin, the KV cache, malloc's heap) and Pss, which counts once a page that
several mappings share (docs/serving.md, "Memory under load").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from script_io import (free_port, non_negative, positive, run_main, start_served, with_machine,  # noqa: E402
                       writable, write_json)

MAX_TOKENS = (8, 24, 48, 96)
PROMPT_REPEATS = (1, 1, 2, 6, 20)  # a prompt repeated: 7 to ~1,200 tokens, so the graphs see varied shapes
BAD_BODIES = ({"temperature": 5}, {"n": 2}, {"model": "nope"}, {"bogus": 1}, {"max_tokens": 0})

# Runs the CLI as `medusa-export` runs it, after starting a thread that answers "probe TAG" / "trim TAG" lines
# written to the FIFO $SERVE_MEMORY_FIFO with a JSON file $SERVE_MEMORY_OUT/TAG.json.
_HOOK = r'''
import collections, ctypes, gc, json, os, sys, threading
FIFO, OUT = os.environ["SERVE_MEMORY_FIFO"], os.environ["SERVE_MEMORY_OUT"]
TRACE = int(os.environ["SERVE_MEMORY_TRACE"])
if TRACE:
    import tracemalloc
    tracemalloc.start(TRACE)
libc = ctypes.CDLL("libc.so.6")
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MallInfo2
def status():
    text = open("/proc/self/status").read()
    return {k: int(text.split(k + ":")[1].split()[0]) // 1024 for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}
def malloc_state():
    m = libc.mallinfo2()
    arenas = 0
    path = os.path.join(OUT, "malloc_info.xml")
    fp = libc.fopen(path.encode(), b"w")
    if fp:
        libc.malloc_info(0, ctypes.c_void_p(fp)); libc.fclose(ctypes.c_void_p(fp))
        arenas = open(path).read().count("<heap nr=")
    mib = lambda b: round(b / 2**20, 1)
    return {"heap_mib": mib(m.arena), "mmapped_mib": mib(m.hblkhd), "in_use_mib": mib(m.uordblks),
            "free_kept_mib": mib(m.fordblks), "arenas": arenas}
libc.fopen.restype = ctypes.c_void_p
def probe(tag):
    gc.collect()
    objs = gc.get_objects()
    counts = collections.Counter(type(o).__qualname__ for o in objs)
    del objs
    row = {"objects": sum(counts.values()), "by_type": dict(counts.most_common(40)), **status(), **malloc_state()}
    if TRACE:
        snap = tracemalloc.take_snapshot()
        snap.dump(os.path.join(OUT, tag + ".snap"))
        row["traced_mib"] = round(tracemalloc.get_traced_memory()[0] / 2**20, 2)
    return row
def trim(tag):
    before = status()
    libc.malloc_trim(0)
    return {"before": before, "after": status(), **malloc_state()}
def answer():
    while True:
        with open(FIFO) as f:
            for line in f:
                cmd, tag = line.split()
                row = {"probe": probe, "trim": trim}[cmd](tag)
                tmp = os.path.join(OUT, tag + ".tmp")
                with open(tmp, "w", encoding="utf-8") as g:
                    json.dump(row, g)
                os.replace(tmp, os.path.join(OUT, tag + ".json"))
threading.Thread(target=answer, name="serve-memory-probe", daemon=True).start()
ORT_OPTIONS = [kv.split("=") for kv in os.environ.get("SERVE_MEMORY_ORT", "").split(",") if kv]
if ORT_OPTIONS:  # session options set on every graph the server opens (what the backend would set)
    import onnxruntime
    opened = onnxruntime.InferenceSession.__init__
    def init(self, path, sess_options=None, *a, **kw):
        for name, value in ORT_OPTIONS:
            setattr(sess_options, name, type(getattr(sess_options, name))(int(value)))
        opened(self, path, sess_options, *a, **kw)
    onnxruntime.InferenceSession.__init__ = init
sys.argv = ["medusa-export", *sys.argv[1:]]
from medusa_export.runtime.cli.app import main
main()
'''


def start_server(args, port: int, probe_dir: Path | None) -> subprocess.Popen:
    """The server, by the project's command (or the probing wrapper around the same CLI), ready to answer."""
    cli = ["serve", args.artifact, "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs",
           str(args.max_num_seqs), "--threads", str(args.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **dict(e.split("=", 1) for e in args.env)}
    if probe_dir is not None:
        os.mkfifo(probe_dir / "fifo")
        env |= {"SERVE_MEMORY_FIFO": str(probe_dir / "fifo"), "SERVE_MEMORY_OUT": str(probe_dir),
                "SERVE_MEMORY_TRACE": str(args.trace), "SERVE_MEMORY_ORT": args.ort}
        cmd = [sys.executable, "-c", _HOOK, *cli]
    else:
        cmd = [sys.executable, "-m", "medusa_export.runtime.cli", *cli]
    return start_served(cmd, port, args.artifact, env)


def rss(pid: int) -> dict:
    """MiB: VmRSS and its parts; Pss counts a page mapped several times (weights.bin, once per graph) once."""
    text = Path(f"/proc/{pid}/status").read_text() + Path(f"/proc/{pid}/smaps_rollup").read_text()
    return {k: int(text.split(k + ":")[1].split()[0]) // 1024
            for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM", "Pss", "Pss_Anon", "Pss_File")}


def mappings(pid: int, top: int = 8) -> dict[str, int]:
    """Resident MiB by what is mapped: a file's path (weights.bin is mapped once per tensor by each open graph, so
    its pages count once per graph that maps them), ``[heap]`` (malloc's main arena), the largest anonymous mapping
    (the KV cache, one mapping of every slot: resident as rows fill) and the other anonymous ones (malloc's thread
    arenas and large blocks, ONNX Runtime's buffers)."""
    maps: list[list] = []  # [name, size, rss kB]
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            maps.append([head[5] if len(head) > 5 else "[anon]", hi - lo, 0])
        elif head and head[0] == "Rss:":
            maps[-1][2] = int(head[1])
    anon = [m for m in maps if m[0] == "[anon]"]
    largest = max(anon, key=lambda m: m[1], default=None)
    by: dict[str, int] = {}
    for m in maps:
        name = ("[anon: largest, KV]" if m is largest else m[0]) if m[0] == "[anon]" else m[0]
        by[name] = by.get(name, 0) + m[2]
    return {k: round(v / 1024) for k, v in sorted(by.items(), key=lambda kv: -kv[1])[:top]}


def ask(probe_dir: Path, cmd: str, tag: str, timeout_s: float = 120) -> dict:
    """One command to the server's probe thread, and its answer."""
    with open(probe_dir / "fifo", "w", encoding="utf-8") as f:  # a command, not a report
        f.write(f"{cmd} {tag}\n")
    path = probe_dir / f"{tag}.json"
    end = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > end:
            raise SystemExit(f"error: the server's probe did not answer {cmd} within {timeout_s:.0f} s")
        time.sleep(0.1)
    return json.loads(path.read_text())


def request_plan(rng: random.Random, prompts: list[str], i: int) -> dict:
    """One request of the mix: its route, body, and whether to close it mid-stream or expect a 4xx."""
    chat = rng.random() < 0.6
    text = " ".join([prompts[i % len(prompts)]] * rng.choice(PROMPT_REPEATS))
    body = {"max_tokens": rng.choice(MAX_TOKENS), "temperature": rng.choice((0, 0, 0.8)), "seed": i,
            "stream": rng.random() < 0.5}
    if not rng.randrange(4):
        body["medusa"] = False
    if body["stream"] and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    body |= {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
    bad = rng.random() < 0.1
    if bad:
        body |= rng.choice(BAD_BODIES)
    cancel = body["stream"] and not bad and rng.random() < 0.2
    return {"path": "/v1/chat/completions" if chat else "/v1/completions", "body": body, "cancel": cancel}


async def send(client, plan: dict) -> str:
    """The request's outcome: its status, "cancelled" (closed after two events), or the client's error."""
    try:
        if not plan["body"]["stream"]:
            r = await client.post(plan["path"], json=plan["body"])
            return str(r.status_code)
        async with client.stream("POST", plan["path"], json=plan["body"]) as r:
            events = 0
            async for line in r.aiter_lines():
                events += line.startswith("data:")
                if plan["cancel"] and events >= 2:
                    return "cancelled"  # leaving the block closes the response: its connection is dropped
            return str(r.status_code)
    except Exception as e:  # noqa: BLE001 - counted
        return type(e).__name__


async def one_round(base: str, prompts: list[str], n: int, concurrency: int, seed: int) -> dict:
    import httpx2 as httpx

    rng = random.Random(seed)
    plans = [request_plan(rng, prompts, seed * n + i) for i in range(n)]
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        async def bounded(plan: dict) -> str:
            async with gate:
                return await send(client, plan)

        outcomes = await asyncio.gather(*(bounded(p) for p in plans))
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o] = counts.get(o, 0) + 1
    return counts


def wait_idle(base: str, timeout_s: float = 60) -> None:
    """Until the server runs and queues nothing (a closed stream's request ends at the engine's next step)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
            text = r.read().decode()
        busy = [line for line in text.splitlines() if line.startswith(("medusa_export:num_requests_running",
                                                                         "medusa_export:num_requests_waiting"))]
        if all(float(line.rsplit(" ", 1)[1]) == 0 for line in busy):
            return
        time.sleep(0.2)


def measure(args, prompts: list[str], probe_dir: Path | None) -> list[dict]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(args, port, probe_dir)
    rows = []
    try:
        for k in range(args.rounds + 1):  # round 0: the server as it starts listening
            t0 = time.perf_counter()
            row = {"round": k}
            if k:
                row["outcomes"] = asyncio.run(one_round(base, prompts, args.requests, args.concurrency, k))
                wait_idle(base)
                time.sleep(1.0)
                row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row | state(proc.pid, probe_dir, k, args.trim))
            print(json.dumps(_shown(rows[-1])), flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rows


def state(pid: int, probe_dir: Path | None, k: int, trim: bool) -> dict:
    """The server's memory after round ``k``: from /proc, and from its probe thread when there is one (then
    ``trim``: VmRSS before and after ``malloc_trim(0)``)."""
    row = {**rss(pid), "mappings": mappings(pid)}
    if probe_dir is not None:
        row["probe"] = ask(probe_dir, "probe", f"r{k}")
        if trim and k:
            row["trim"] = ask(probe_dir, "trim", f"t{k}")
    return row


def _shown(row: dict) -> dict:
    """A round's row without the long object counts."""
    probe = {k: v for k, v in row.get("probe", {}).items() if k != "by_type"}
    return {**row, **({"probe": probe} if probe else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--rounds", type=positive, default=8)
    ap.add_argument("--requests", type=positive, default=40, help="requests per round")
    ap.add_argument("--concurrency", type=positive, default=10)
    ap.add_argument("--max-num-seqs", type=positive, default=8)
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE in the server's environment")
    ap.add_argument("--probe", action="store_true", help="report Python objects and malloc's state after each round")
    ap.add_argument("--trim", action="store_true", help="with --probe: malloc_trim(0) after each round")
    ap.add_argument("--ort", default="", help="with --probe: ONNX Runtime session options for every graph, "
                    "e.g. enable_cpu_mem_arena=0,enable_mem_pattern=1 (the backend opens graphs with it 0)")
    ap.add_argument("--trace", type=non_negative, default=0, help="with --probe: tracemalloc frames (0: off)")
    ap.add_argument("--out-dir", type=Path, default=None, help="with --probe: where snapshots go (default: a temp dir)")
    ap.add_argument("--json", type=writable, default=None)
    args = ap.parse_args()
    if not Path(args.artifact, "manifest.json").is_file():
        ap.error(f"{args.artifact} is not an artifact directory (no manifest.json)")
    if any("=" not in e for e in args.env):
        ap.error("--env takes NAME=VALUE")
    if (args.trim or args.trace or args.ort) and not args.probe:
        ap.error("--trim, --trace and --ort need --probe")
    from medusa_export.runtime.prompts import read_prompts

    prompts = read_prompts(None)
    if args.probe:
        probe_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="serve-memory-"))
        probe_dir.mkdir(parents=True, exist_ok=True)
        (probe_dir / "fifo").unlink(missing_ok=True)
    else:
        probe_dir = None
    rows = measure(args, prompts, probe_dir)
    if args.json:
        settings = {k: getattr(args, k) for k in ("rounds", "requests", "concurrency", "max_num_seqs", "threads", "env",
                                                  "probe", "trim", "trace", "ort")}
        write_json(args.json, with_machine({"artifact": args.artifact, **settings, "rows": rows}))


if __name__ == "__main__":
    run_main(main)
