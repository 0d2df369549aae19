"""Streaming cost per token vs output length: the runtime's incremental detokenizer against decoding the whole
output at every step (what the runtime did before), on a real tokenizer, without the model.

    python scripts/bench_streaming.py ARTIFACT [--tokens 2000] [--json out.json]

Tokens come from the artifact's own tokenizer (a long English text encoded and repeated); they are pushed in
steps of 1-3 tokens as Medusa accepts them. Reported per bucket of 250 tokens: microseconds of detokenization
per token. Flat means the cost does not grow with the answer's length.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from medusa_export.runtime.detokenize import IncrementalDetokenizer
from medusa_export.runtime.manifest import Manifest
from medusa_export.runtime.tokenizer import ChatTokenizer
from script_io import run_main, with_machine, writable, write_json  # noqa: E402

TEXT = ("Speculative decoding drafts several tokens and verifies them in one forward pass. Medusa adds small heads "
        "to the last hidden state; each guesses a token further ahead. Les modèles multilingues écrivent aussi "
        "« café » et 日本語. ")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--bucket", type=int, default=250)
    ap.add_argument("--json", type=writable)
    args = ap.parse_args()
    tok = ChatTokenizer.from_artifact(args.artifact, Manifest.read(args.artifact))
    base = tok.encode(TEXT)
    ids = (base * (args.tokens // len(base) + 1))[: args.tokens]
    rng = np.random.default_rng(0)
    steps, a = [], 0
    while a < len(ids):
        b = min(len(ids), a + int(rng.integers(1, 4)))
        steps.append((a, b))
        a = b
    report = {"tokens": len(ids), "steps": len(steps), "bucket": args.bucket, "us_per_token": {}}
    for name in ("full_decode", "incremental"):
        per = np.zeros((len(ids) + args.bucket - 1) // args.bucket)
        if name == "incremental":
            detok = IncrementalDetokenizer(tok.decode)
            pieces = []
            for a, b in steps:
                t0 = time.perf_counter()
                pieces.append(detok.push(ids[a:b]))
                per[a // args.bucket] += time.perf_counter() - t0
            pieces.append(detok.flush())
        else:
            shown, pieces = 0, []
            for a, b in steps:
                t0 = time.perf_counter()
                text = tok.decode(ids[:b]).rstrip("\ufffd")  # held back until the character is complete
                pieces.append(text[shown:])
                shown = len(text)
                per[a // args.bucket] += time.perf_counter() - t0
        assert "".join(pieces) == tok.decode(ids).rstrip("\ufffd"), name  # both stream exactly the full text
        report["us_per_token"][name] = [round(1e6 * s / args.bucket, 2) for s in per]
    print(f"{'tokens':>12}" + "".join(f"{f'{i * args.bucket}-{(i + 1) * args.bucket}':>12}"
                                      for i in range(len(report['us_per_token']['incremental']))))
    for name, row in report["us_per_token"].items():
        print(f"{name:>12}" + "".join(f"{v:>12.1f}" for v in row))
    inc = report["us_per_token"]["incremental"]
    report["incremental_last_over_first"] = round(inc[-1] / inc[0], 2)
    print(f"incremental: last bucket / first bucket = {report['incremental_last_over_first']} "
          f"(full decode: {report['us_per_token']['full_decode'][-1] / report['us_per_token']['full_decode'][0]:.1f})")
    if args.json:
        write_json(args.json, with_machine(report), indent=2)


if __name__ == "__main__":
    run_main(main)
