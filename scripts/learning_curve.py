"""Held-out head accuracy as a function of training positions: is more data still paying?

    python scripts/learning_curve.py --positions 100000 300000 1000000 --json scripts/results/default_cpu/learning_curve.json

Runs the shipped recipe (scripts/train_default_heads.sh's options, on its distillation cache, so no new
generation) with ``--max-train-positions N`` for each N, one epoch each by default, and collects every run's
held-out table (the same held-out prompts for every N: the split is by prompt and seeded). Extra arguments after
``--`` go to train-heads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from script_io import run_main, with_machine, writable, write_json  # noqa: E402

RECIPE = ["--data", "sharegpt", "--max-new-tokens", "192", "--gen-batch-size", "128", "--num-heads", "4",
          "--num-layers", "1", "--seed", "0", "--heldout-fraction", "0.04", "--lr", "3e-3", "--batch-size", "256",
          "--draft-vocab", "8192", "--amp", "auto"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--positions", type=int, nargs="+", required=True)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default="work-cache/distill")
    p.add_argument("--out", type=Path, default=Path("work-cache/learning-curve"))
    p.add_argument("--json", type=writable, default=None)
    a, extra = p.parse_known_args()
    extra = [x for x in extra if x != "--"]
    rows = []
    for n in a.positions:
        out = a.out / f"positions-{n}"
        cmd = [sys.executable, "-m", "medusa_export.runtime.cli", "train-heads", *RECIPE, "--out", str(out),
               "--cache-dir", a.cache_dir, "--epochs", str(a.epochs), "--threads", str(a.threads),
               "--max-train-positions", str(n), "--no-progress", *extra]
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        record = json.loads((out / "training.json").read_text())
        row = {"max_train_positions": n, "training_positions": record["training_positions"],
               "epochs": a.epochs, "heldout": record["heldout"],
               "train_positions_per_s": record["train_positions_per_s"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        write_json(a.json, with_machine({"recipe": RECIPE, "rows": rows}), indent=2)


if __name__ == "__main__":
    run_main(main)
