"""Per-head accuracy of an artifact's heads while decoding a prompt set (greedy), for reports.

    python scripts/head_accuracy.py artifacts/smollm2 --prompts question.jsonl --json acc.json

Each prompt is decoded greedily (128 new tokens by default); at every position head d's top-1 / top-5 is scored
against the token the base model produces d + 2 positions ahead (the calibration's measurement, on whatever
prompts are given: for a report this may be MT-Bench; a tree is never chosen from it). Also prints the expected
accepted length of a chain of heads (product of conditional top-1 rates), what `chain-4` would accept.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from medusa_export.runtime.api import MedusaRuntime
from medusa_export.runtime.calibration import head_predictions, measure_head_accuracy
from medusa_export.runtime.prompts import read_prompts
from script_io import positive, run_main, with_machine, writable, write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--prompts", type=Path, required=True)
    p.add_argument("--limit", type=positive, default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=writable, default=None)
    a = p.parse_args()
    with MedusaRuntime.load(a.artifact, threads=a.threads) as rt:
        tok, backend = rt.generator.tokenizer, rt.generator.backend
        ids = [tok.encode_prompt(x) for x in read_prompts(a.prompts, limit=a.limit)]
        t0 = time.perf_counter()
        acc = measure_head_accuracy(head_predictions(backend, ids, a.max_new_tokens, tok.eos_token_ids))
        seconds = time.perf_counter() - t0
    top1 = acc.marginal[:, 0]
    top5 = acc.marginal[:, :5].sum(axis=1)
    chain = float(np.sum(np.cumprod(acc.conditional[:, 0])))  # expected extra tokens of a chain of top-1s
    report = {"artifact": a.artifact.name, "heads_sha256": rt.manifest.heads.sha256,
              "prompts": len(ids), "max_new_tokens": a.max_new_tokens, "positions": acc.positions.tolist(),
              "top1": [round(float(x), 4) for x in top1], "top5": [round(float(x), 4) for x in top5],
              "chain_expected_accepted": round(1 + chain, 4), "decode_s": round(seconds, 1)}
    print(json.dumps(report))
    if a.json:
        write_json(a.json, with_machine(report), indent=2)


if __name__ == "__main__":
    run_main(main)
