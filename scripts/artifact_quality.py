"""Top-1 agreement and perplexity change of one artifact against another (teacher-forced on the reference's greedy
answers, as `build`'s quality check), on a slice of a prompt file:

    python scripts/artifact_quality.py artifacts/smollm2 artifacts/smollm2-int4 --prompts train_prompts.jsonl \
        --first 40 --count 60 [--json-lines out.jsonl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medusa_export.runtime.api import MedusaRuntime
from medusa_export.runtime.quality import quality
from script_io import finite, non_negative, positive, prompt_rows, run_main, with_machine, writable  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", type=Path)
    ap.add_argument("candidate", type=Path)
    ap.add_argument("--prompts", type=Path, default=None, help="JSONL prompts (default: the packaged set)")
    ap.add_argument("--first", type=non_negative, default=0)
    ap.add_argument("--count", type=positive, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json-lines", type=writable, default=None, help="append the result here")
    args = ap.parse_args()
    prompts = prompt_rows(args.prompts, args.first, args.count)
    r = quality(MedusaRuntime.load(args.reference, threads=args.threads).generator,
                MedusaRuntime.load(args.candidate, threads=args.threads).generator, prompts)
    row = {"reference": str(args.reference), "candidate": str(args.candidate),
           "prompts": str(args.prompts) if args.prompts else "packaged", "first": args.first, "count": len(prompts),
           "positions": r.positions, "top1": r.top1_agreement, "perplexity_change": r.perplexity_change}
    print(json.dumps(row))
    if args.json_lines:
        with args.json_lines.open("a") as f:
            f.write(json.dumps(finite(with_machine(row)), allow_nan=False) + "\n")


if __name__ == "__main__":
    run_main(main)
