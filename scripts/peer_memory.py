"""Resident memory and load time of each engine for the same model: ours (an artifact: one stream, then also
after batched steps) and the peers of `compare_peers.py` (optional extras), each in a fresh process that loads
the model and generates 32 greedy tokens from the same token ids (2 threads).

    python scripts/peer_memory.py --ours artifacts/smollm2 artifacts/smollm2-int8 --genai genai-fp32 \\
        --openvino ov-fp32 --gguf ggufs/model.F16.gguf --peers-python /path/to/peers/bin/python --json memory.json

Compare VmHWM, the peak resident set (MiB; file-backed pages included: ONNX Runtime maps our weights.bin,
llama.cpp its GGUF): the peers' runners free their model when they return, so their VmRSS afterwards says
nothing. Ours reports the peak after the one-stream generation (``one_stream``) and after batched steps too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from script_io import run_main, with_machine, writable, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 314, 11, 1]  # any token ids of the vocabulary
TOKENS = 32

_MEASURE = """
import json, sys, time
sys.path.insert(0, {scripts!r})
def mem():
    s = open("/proc/self/status").read()
    return {{k: int(s.split(k + ":")[1].split()[0]) // 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}}
t0 = time.perf_counter()
{body}
print(json.dumps({{"load_and_generate_s": round(time.perf_counter() - t0, 2), **mem(), **extra}}))
"""

_BODIES = {
    "ours": """
from medusa_export.runtime.api import MedusaRuntime
rt = MedusaRuntime.load({path!r}, threads=2)
rt.generate({prompt!r}, max_new_tokens={tokens}, chat=False)
extra = {{"one_stream": mem()}}
rt.generate_many([{prompt!r}, {prompt!r}[:7]], max_new_tokens={tokens}, chat=False)
""",
    "genai": """
from pathlib import Path
from peer_runners import run_genai
run_genai(Path({path!r}), [{prompt!r}], {tokens}, 1, set(), 2, pad_id=0)
extra = {{}}
""",
    "openvino": """
from pathlib import Path
from peer_runners import run_openvino
run_openvino(Path({path!r}), [{prompt!r}], {tokens}, 1, {{2}}, 2, exact=True)
extra = {{}}
""",
    "gguf": """
from pathlib import Path
from peer_runners import run_llama_cpp
run_llama_cpp(Path({path!r}), [{prompt!r}], {tokens}, set(), 2)
extra = {{}}
""",
}


def measure(kind: str, path: str, python: str) -> dict:
    body = _BODIES[kind].format(path=str(path), prompt=PROMPT, tokens=TOKENS)
    code = _MEASURE.format(scripts=str(HERE), body=body)
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        return {"engine": kind, "model": str(path), "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return {"engine": kind, "model": str(path), **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", nargs="*", default=[])
    ap.add_argument("--genai", nargs="*", default=[])
    ap.add_argument("--openvino", nargs="*", default=[])
    ap.add_argument("--gguf", nargs="*", default=[])
    ap.add_argument("--peers-python", default=sys.executable, help="the Python that has the peers installed")
    ap.add_argument("--json", type=writable, default=None)
    args = ap.parse_args()
    rows = [measure("ours", p, sys.executable) for p in args.ours]
    rows += [measure(kind, p, args.peers_python) for kind in ("genai", "openvino", "gguf") for p in getattr(args, kind)]
    for row in rows:
        print(json.dumps(row))
    if args.json:
        write_json(args.json, with_machine({"tokens": TOKENS, "threads": 2, "rows": rows}), indent=1)


if __name__ == "__main__":
    run_main(main)
