"""Ours vs the tools a CPU user would pick instead, side by side in one run: same prompts (chat template), same
token budget, greedy, same thread count. Peers are optional: a row whose tool is not installed is skipped
with the reason.

    python scripts/compare_peers.py --prompts question.jsonl --limit 20 --threads 2 \\
        --ours artifacts/smollm2 artifacts/smollm2-int8 --genai genai-int4/ --gguf model.Q8_0.gguf \\
        --json peers.json --plot peers.png

* ours: each artifact, vanilla and Medusa (ONNX Runtime);
* onnxruntime-genai (``pip install onnxruntime-genai``): a model directory from its builder on the same weights,
  ``python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p int4 -e cpu`` (HF_DIR: the fp32 directory
  medusa-export caches for the default model under ``$MEDUSA_EXPORT_CACHE/models/``);
* llama.cpp through llama-cpp-python on GGUF files of the same weights (scripts/make_ggufs.py). It compiles
  from source; on this VM the native build (``CMAKE_ARGS="-DGGML_NATIVE=ON"``) compiled but died with "Illegal
  instruction", the portable AVX2 build runs: ``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON
  -DGGML_F16C=ON -DGGML_AVX512=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 pip install llama-cpp-python`` (0.3.36, 193
  compile steps, ~8 min on 2 cores, gcc 12).

Per row: decode tokens/s (after the first token), end-to-end tokens/s (prefill included), median time to first
token, and agreement with the first artifact's fp32 greedy vanilla tokens (share of prompts with the same answer
and share of answer tokens before the first difference). GGUFs of the same weights: scripts/make_ggufs.py.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from medusa_export.runtime.api import MedusaRuntime
from medusa_export.runtime.prompts import read_prompts


def _summary(name: str, runs: list[dict], reference: list[list[int]] | None) -> dict:
    tokens = sum(len(r["ids"]) for r in runs)
    total = sum(r["total_s"] for r in runs)
    decode = sum(r["total_s"] - r["ttft_s"] for r in runs)
    row = {"name": name, "new_tokens": tokens, "e2e_tokens_per_s": round(tokens / total, 2),
           "decode_tokens_per_s": round(sum(max(len(r["ids"]) - 1, 0) for r in runs) / decode, 2),
           "ttft_ms_p50": round(1e3 * float(np.median([r["ttft_s"] for r in runs])), 1)}
    if reference is not None:
        same = [r["ids"] == ref for r, ref in zip(runs, reference)]
        prefix = [next((i for i, (a, b) in enumerate(zip(r["ids"], ref)) if a != b), min(len(r["ids"]), len(ref)))
                  / max(len(ref), 1) for r, ref in zip(runs, reference)]
        row.update(identical_to_reference=f"{sum(same)}/{len(same)}", agreement=round(float(np.mean(prefix)), 3))
    return row


def run_ours(artifact: Path, prompts: list[str], max_new: int, threads: int) -> list[tuple[str, list[dict]]]:
    rows = []
    with MedusaRuntime.load(artifact, backend="ort", threads=threads) as rt:
        weights = rt.manifest.weights
        rt.generate(prompts[0], max_new_tokens=8)  # warm-up
        for medusa in (False, True):
            runs = []
            for p in prompts:
                t0, first, ids = time.perf_counter(), None, []
                for event in rt.stream(p, max_new_tokens=max_new, medusa=medusa):
                    first = first or time.perf_counter()
                    ids += event.token_ids
                runs.append({"ids": ids, "ttft_s": first - t0, "total_s": time.perf_counter() - t0})
            rows.append((f"medusa-export {weights} {'medusa' if medusa else 'vanilla'} ({artifact.name})", runs))
    return rows


def run_genai(model_dir: Path, prompts: list[str], max_new: int, threads: int, tokenizer) -> list[dict]:
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    runs = []
    for p in prompts:
        ids = tokenizer.encode_prompt(p)  # the same chat template and token ids as ours
        t0 = time.perf_counter()
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + max_new)
        gen = og.Generator(model, params)
        gen.append_tokens(np.asarray(ids, np.int32))
        out, first = [], None
        while not gen.is_done() and len(out) < max_new:
            gen.generate_next_token()
            tok = int(gen.get_next_tokens()[0])
            first = first or time.perf_counter()
            if tok in tokenizer.eos_token_ids:
                break
            out.append(tok)
        runs.append({"ids": out, "ttft_s": first - t0, "total_s": time.perf_counter() - t0})
    return runs


def run_llama_cpp(gguf: Path, prompts: list[str], max_new: int, threads: int, tokenizer) -> list[dict]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_batch=512, verbose=False)
    runs = []
    for p in prompts:
        ids = tokenizer.encode_prompt(p)
        llm.reset()
        t0, first, out = time.perf_counter(), None, []
        for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            first = first or time.perf_counter()
            if tok in tokenizer.eos_token_ids or len(out) >= max_new:
                break
            out.append(int(tok))
        runs.append({"ids": out, "ttft_s": first - t0, "total_s": time.perf_counter() - t0})
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ours", type=Path, nargs="+", required=True, help="artifacts; the first (fp32) is the reference")
    ap.add_argument("--genai", type=Path, nargs="*", default=[], help="onnxruntime-genai model directories")
    ap.add_argument("--gguf", type=Path, nargs="*", default=[], help="GGUF files for llama.cpp")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path, help="PNG bar chart of decode and end-to-end tokens/s per row")
    args = ap.parse_args()
    prompts = read_prompts(args.prompts, limit=args.limit)
    rows, reference, skipped = [], None, []
    for artifact in args.ours:
        for name, runs in run_ours(artifact, prompts, args.max_new_tokens, args.threads):
            reference = reference or [r["ids"] for r in runs]  # the first artifact's vanilla row
            rows.append(_summary(name, runs, reference))
            print(json.dumps(rows[-1]), flush=True)
    tokenizer = MedusaRuntime.load(args.ours[0], backend="ort").generator.tokenizer
    peers = [("onnxruntime-genai", d, run_genai) for d in args.genai] + [("llama.cpp", g, run_llama_cpp) for g in args.gguf]
    for tool, path, fn in peers:
        try:
            runs = fn(path, prompts, args.max_new_tokens, args.threads, tokenizer)
        except ImportError as e:
            skipped.append(f"{tool} ({path.name}): not installed ({e.name})")
            continue
        rows.append(_summary(f"{tool} ({path.name})", runs, reference))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'row':<58}{'decode tok/s':>13}{'e2e tok/s':>11}{'TTFT ms':>9}{'identical':>11}{'agreement':>11}")
    for r in rows:
        print(f"{r['name']:<58}{r['decode_tokens_per_s']:>13.1f}{r['e2e_tokens_per_s']:>11.1f}{r['ttft_ms_p50']:>9.0f}"
              f"{r.get('identical_to_reference', '-'):>11}{r.get('agreement', 0):>11.3f}")
    for s in skipped:
        print("skipped:", s)
    if args.json:
        args.json.write_text(json.dumps({"prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                                         "threads": args.threads, "rows": rows, "skipped": skipped}, indent=2) + "\n")
    if args.plot:
        plot(rows, args.plot, f"{len(prompts)} prompts, {args.max_new_tokens} new tokens, {args.threads} threads")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    ax.barh(y + 0.2, [r["decode_tokens_per_s"] for r in rows], 0.4, label="decode tok/s", color="#4C72B0")
    ax.barh(y - 0.2, [r["e2e_tokens_per_s"] for r in rows], 0.4, label="end-to-end tok/s", color="#DD8452")
    ax.set_yticks(y, [r["name"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tokens / s")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
