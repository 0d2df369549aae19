"""Ours vs the tools a CPU user would pick instead, side by side in one run: same prompt token ids (chat
template), same token budget, greedy, same thread count, the same number of requests in flight. Peers are
optional: a row whose tool is not installed is skipped with the reason.

    python scripts/compare_peers.py --prompts question.jsonl --limit 16 --threads 2 --concurrency 1 8 \\
        --ours artifacts/smollm2 artifacts/smollm2-int8 --openvino ov-fp32/ ov-int8/ \\
        --genai genai-fp32/ genai-int8/ --ct2 ct2-fp32/ --gguf model.Q8_0.gguf --json peers.json --plot peers.png

At each ``--concurrency`` N the prompts run closed-loop, N in flight (a request starts when one ends); N = 1 is
one stream at a time. Rows (`peer_runners.py`):

* ours: each artifact, vanilla and speculative (the heads' tree and context drafts), ONNX Runtime; N > 1 through
  the batched engine;
* OpenVINO GenAI (``pip install openvino-genai``) on an OpenVINO IR of the same weights
  (``optimum-cli export openvino --model HF_DIR --task text-generation-with-past --weight-format fp32|int8 OUT``,
  from ``pip install optimum-intel[openvino]``): plain and prompt lookup alone, its continuous-batching pipeline
  for N > 1; fp32 activations and KV cache unless ``--openvino-defaults`` (then also its defaults: bf16 compute
  on CPUs with bf16, u8 KV cache);
* onnxruntime-genai (``pip install onnxruntime-genai``): a model directory from its builder,
  ``python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p fp32|int8|int4 -e cpu``: plain and its n-gram
  speculation alone, static batches of N for N > 1;
* CTranslate2 (``pip install ctranslate2``) on a directory from
  ``ct2-transformers-converter --model HF_DIR --output_dir OUT --quantization float32|int8``: batches of N;
* llama.cpp through llama-cpp-python on GGUF files of the same weights (scripts/make_ggufs.py), N = 1 only. It
  compiles from source; where the native build (``CMAKE_ARGS="-DGGML_NATIVE=ON"``) dies with "Illegal
  instruction", the portable AVX2 build runs: ``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON
  -DGGML_F16C=ON -DGGML_AVX512=OFF" pip install llama-cpp-python``.

HF_DIR is the fp32 directory medusa-export caches for the default model under ``$MEDUSA_EXPORT_CACHE/models/``
(``~/.cache/medusa-export/models/``). Per row: aggregate tokens/s (all answer tokens over the row's wall time,
prefill included), per-stream decode tokens/s (after the first token), time to first token and the gap between
deliveries of tokens (p50 and p99, ms), and agreement with the first artifact's fp32 greedy vanilla answers at
N = 1 (answers identical, and the mean share of answer tokens before the first difference).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_runners import Run, run_ctranslate2, run_genai, run_llama_cpp, run_openvino, run_ours  # noqa: E402
from script_io import positive, run_main, writable, write_json as write_json_file  # noqa: E402

from medusa_export.runtime.api import MedusaRuntime  # noqa: E402
from medusa_export.runtime.machine import machine_info  # noqa: E402
from medusa_export.runtime.prompts import read_prompts  # noqa: E402
from medusa_export.runtime.warm_up import warm_up_backend  # noqa: E402


def summarize(name: str, concurrency: int, runs: list[Run], reference: list[list[int]] | None) -> dict:
    tokens = sum(len(r.ids) for r in runs)
    wall = max(r.done for r in runs) - min(r.submitted for r in runs)
    wall = max(wall, 1e-9)  # a row of empty answers can end within the clock's resolution
    ttft = [r.arrivals[0] - r.submitted for r in runs if r.arrivals]
    gaps = np.concatenate([np.diff(r.arrivals) for r in runs] + [np.zeros(0)])
    decode = [(len(r.ids) - 1) / (r.done - r.arrivals[0]) for r in runs if len(r.ids) > 1 and r.done > r.arrivals[0]]
    ms = lambda v, q: round(1e3 * float(np.percentile(v, q)), 1) if len(v) else None  # noqa: E731
    row = {"name": name, "concurrency": concurrency, "new_tokens": tokens,
           "tokens_per_s": round(tokens / wall, 2),
           "stream_decode_tokens_per_s": round(float(np.mean(decode)), 2) if decode else None,
           "ttft_ms_p50": ms(ttft, 50), "ttft_ms_p99": ms(ttft, 99), "gap_ms_p50": ms(gaps, 50),
           "gap_ms_p99": ms(gaps, 99)}
    if reference is not None:
        same = [r.ids == ref for r, ref in zip(runs, reference)]
        prefix = [next((i for i, (a, b) in enumerate(zip(r.ids, ref)) if a != b), min(len(r.ids), len(ref)))
                  / max(len(ref), 1) for r, ref in zip(runs, reference)]
        row.update(identical_to_reference=f"{sum(same)}/{len(same)}", agreement=round(float(np.mean(prefix)), 3))
    return row


def peer_jobs(args, prompts: list[list[int]], eos: set[int], pad_id: int,
              id_to_token) -> list[tuple[str, str, int, object]]:
    """(tool, row name, concurrency, thunk returning runs) for every peer row asked for."""
    n, t = args.max_new_tokens, args.threads
    jobs = []
    for c in args.concurrency:
        for d in args.openvino:
            precisions = (True, False) if args.openvino_defaults else (True,)
            for exact in precisions:
                label = "" if exact else ", its defaults (bf16, u8 KV)"
                kind = "continuous batching" if c > 1 else "plain"
                jobs.append(("openvino-genai", f"OpenVINO GenAI {kind} ({d.name}{label})", c,
                             lambda d=d, c=c, e=exact: run_openvino(d, prompts, n, c, eos, t, e)))
            if c == 1:
                jobs.append(("openvino-genai", f"OpenVINO GenAI prompt lookup ({d.name})", c,
                             lambda d=d: run_openvino(d, prompts, n, 1, eos, t, True, prompt_lookup=True)))
        for d in args.genai:
            kind = f"static batch {c}" if c > 1 else "plain"
            jobs.append(("onnxruntime-genai", f"onnxruntime-genai {kind} ({d.name})", c,
                         lambda d=d, c=c: run_genai(d, prompts, n, c, eos, t, pad_id)))
            if c == 1:
                jobs.append(("onnxruntime-genai", f"onnxruntime-genai n-gram speculation ({d.name})", c,
                             lambda d=d: run_genai(d, prompts, n, 1, eos, t, pad_id, ngram=True)))
        for d in args.ct2:
            kind = f"batch {c}" if c > 1 else "plain"
            jobs.append(("ctranslate2", f"CTranslate2 {kind} ({d.name})", c,
                         lambda d=d, c=c: run_ctranslate2(d, prompts, n, c, eos, t, id_to_token)))
        if c == 1:
            for g in args.gguf:
                jobs.append(("llama.cpp", f"llama.cpp ({g.name})", c, lambda g=g: run_llama_cpp(g, prompts, n, eos, t)))
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--limit", type=positive, default=16)
    ap.add_argument("--max-new-tokens", type=positive, default=128)
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--concurrency", type=positive, nargs="+", default=[1],
                    help="requests in flight; several: one row each")
    ap.add_argument("--ours", type=Path, nargs="+", required=True, help="artifacts; the first (fp32) is the reference")
    ap.add_argument("--openvino", type=Path, nargs="*", default=[], help="OpenVINO IR directories (optimum-cli)")
    ap.add_argument("--openvino-defaults", action="store_true", help="also OpenVINO's default precisions")
    ap.add_argument("--genai", type=Path, nargs="*", default=[], help="onnxruntime-genai model directories")
    ap.add_argument("--ct2", type=Path, nargs="*", default=[], help="CTranslate2 model directories")
    ap.add_argument("--gguf", type=Path, nargs="*", default=[], help="GGUF files for llama.cpp")
    ap.add_argument("--json", type=writable)
    ap.add_argument("--plot", type=writable, help="PNG bar chart of tokens/s per row")
    args = ap.parse_args()
    # Ascending: the reference (the first artifact's vanilla answers) comes from the N = 1 row when there is one.
    args.concurrency = sorted(set(args.concurrency))
    for p in [*args.ours, *args.openvino, *args.genai, *args.ct2, *args.gguf]:
        if not p.exists():
            ap.error(f"{p} does not exist")
    rows, reference, skipped = [], None, []

    def add(name: str, c: int, runs: list[Run]) -> None:
        rows.append(summarize(name, c, runs, reference))
        print(json.dumps(rows[-1]), flush=True)
        if args.json:  # after every row: a long comparison that stops keeps what it measured
            write_json(args.json, len(prompts), args, rows, skipped)

    with MedusaRuntime.load(args.ours[0], backend="ort") as rt:
        tokenizer = rt.generator.tokenizer
        prompts = [tokenizer.encode_prompt(p) for p in read_prompts(args.prompts, limit=args.limit)]
        eos = set(tokenizer.eos_token_ids)
    pad_id = next(i for i in range(tokenizer.vocab_size) if all(i not in p for p in prompts) and i not in eos)
    for artifact in args.ours:
        with MedusaRuntime.load(artifact, backend="ort", threads=args.threads) as rt:
            # Warm-up: every graph a row uses opens and runs once here, not inside the first row that needs it
            # (the vanilla graph opened in the vanilla rows' timing before: ~1.7 s for the default model).
            rt.generate(prompts[0], max_new_tokens=8)
            warm_up_backend(rt.generator)
            weights = rt.manifest.weights
            for c in args.concurrency:
                for medusa in (False, True):
                    runs = run_ours(rt, prompts, args.max_new_tokens, c, medusa)
                    reference = reference or [r.ids for r in runs]  # the first artifact's vanilla row, alone
                    mode = "medusa+context" if medusa else "vanilla"
                    add(f"medusa-export {weights} {mode} ({artifact.name})", c, runs)
    for tool, name, c, job in peer_jobs(args, prompts, eos, pad_id, tokenizer.tokenizer.id_to_token):
        try:
            runs = job()
        except ImportError as e:
            skipped.append(f"{name}: {tool} not installed ({e.name}): pip install {PEER_PACKAGES[tool]}")
            print("skipped:", skipped[-1], flush=True)
            continue
        except Exception as e:  # noqa: BLE001 - one tool failing (a wrong directory, a changed API) loses its row only
            skipped.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            print("skipped:", skipped[-1], flush=True)
            continue
        add(name, c, runs)
    print(f"\n{'row':<62}{'N':>3}{'tok/s':>8}{'stream':>8}{'TTFT p50/p99':>15}{'gap p50/p99':>14}{'identical':>10}"
          f"{'agree':>7}")
    num = lambda v, w: f"{v:>{w}.0f}" if v is not None else f"{'-':>{w}}"  # noqa: E731
    for r in rows:
        print(f"{r['name'][:61]:<62}{r['concurrency']:>3}{r['tokens_per_s']:>8.1f}"
              f"{num(r['stream_decode_tokens_per_s'], 8)}{num(r['ttft_ms_p50'], 8)}/{num(r['ttft_ms_p99'], 6)}"
              f"{num(r['gap_ms_p50'], 7)}/{num(r['gap_ms_p99'], 6)}"
              f"{r.get('identical_to_reference', '-'):>10}{r.get('agreement', 0):>7.3f}")
    for s in skipped:
        print("skipped:", s)
    if args.json:
        write_json(args.json, len(prompts), args, rows, skipped)
    if args.plot:
        plot(rows, args.plot, f"{len(prompts)} prompts, {args.max_new_tokens} new tokens, {args.threads} threads")


PEER_PACKAGES = {"openvino-genai": "openvino-genai", "onnxruntime-genai": "onnxruntime-genai",
                 "ctranslate2": "ctranslate2", "llama.cpp": "llama-cpp-python"}


def write_json(path: Path, prompts: int, args, rows: list[dict], skipped: list[str]) -> None:
    write_json_file(path, {"prompts": prompts, "max_new_tokens": args.max_new_tokens, "threads": args.threads,
                                "concurrency": args.concurrency, "machine": machine_info(), "rows": rows,
                                "skipped": skipped})


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    ax.barh(y + 0.2, [r["stream_decode_tokens_per_s"] or 0 for r in rows], 0.4, label="per-stream decode tok/s",
            color="#4C72B0")
    ax.barh(y - 0.2, [r["tokens_per_s"] for r in rows], 0.4, label="aggregate tok/s (prefill included)",
            color="#DD8452")
    ax.set_yticks(y, [f"{r['name']} x{r['concurrency']}" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tokens / s")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    run_main(main)
