"""What the heads add once context and corpus drafts run: three modes of one artifact in one process, taking turns
prompt by prompt (prompt i starts with mode i mod 3) — vanilla, the runtime's own choice of graph per request
(`Speculation.heads_for`), and drafts only (the heads' graph never chosen) — greedy, tok/s over all answers and the
ratio to vanilla; every speculative answer is checked against vanilla's tokens.

    python scripts/heads_choice_ab.py artifacts/smollm2 --prompts train_prompts.jsonl --first 100 --count 48 \
        [--max-new-tokens 128] [--threads 2] [--json out.json]

The three modes share one runtime, so step costs and acceptance rates are learned from all of them, as in `bench`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from medusa_export.runtime.api import MedusaRuntime
from medusa_export.runtime.decode import GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from script_io import non_negative, positive, prompt_rows, run_main, with_machine, writable, write_json  # noqa: E402

MODES = ("vanilla", "choice", "drafts_only")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--first", type=non_negative, default=0)
    ap.add_argument("--count", type=positive, default=48)
    ap.add_argument("--max-new-tokens", type=positive, default=128)
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--json", type=writable)
    args = ap.parse_args()
    rt = MedusaRuntime.load(args.artifact, threads=args.threads)
    gen = rt.generator
    prompts = prompt_rows(args.prompts, args.first, args.count)
    if not prompts:
        ap.error(f"--first {args.first} is past the last prompt of {args.prompts}")
    choose = gen.spec.heads_for
    cfgs = {"vanilla": GenerationConfig(max_new_tokens=args.max_new_tokens, medusa=False),
            "choice": GenerationConfig(max_new_tokens=args.max_new_tokens),
            "drafts_only": GenerationConfig(max_new_tokens=args.max_new_tokens)}
    # Warm-up: both graphs open and run once before anything is timed (else the first mode pays for it).
    gen.generate(prompts[0], GenerationConfig(max_new_tokens=8, medusa=False))
    gen.generate(prompts[0], GenerationConfig(max_new_tokens=8))
    tokens, seconds = dict.fromkeys(MODES, 0), dict.fromkeys(MODES, 0.0)
    answers: dict[str, list] = {m: [None] * len(prompts) for m in MODES}
    for i, prompt in enumerate(prompts):
        for mode in MODES[i % 3:] + MODES[:i % 3]:
            gen.spec.heads_for = (lambda tree: None) if mode == "drafts_only" else choose
            t0 = time.perf_counter()
            result = gen.generate(prompt, cfgs[mode])
            seconds[mode] += time.perf_counter() - t0
            tokens[mode] += len(result.token_ids)
            answers[mode][i] = result.token_ids
    gen.spec.heads_for = choose
    vanilla = tokens["vanilla"] / seconds["vanilla"]
    report = {"artifact": args.artifact, "prompts": args.prompts, "first": args.first, "count": len(prompts),
              "max_new_tokens": args.max_new_tokens, "threads": args.threads,
              "identical": {m: answers[m] == answers["vanilla"] for m in MODES[1:]},
              "modes": {m: {"tokens_per_s": round(tokens[m] / seconds[m], 2),
                            "vs_vanilla": round(tokens[m] / seconds[m] / vanilla, 3) if vanilla else None} for m in MODES}}
    print(json.dumps(report, indent=2))
    if args.json:
        write_json(args.json, with_machine(report))


if __name__ == "__main__":
    run_main(main)
