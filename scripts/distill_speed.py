"""Self-distillation throughput: generated tokens/s of the static-cache engine vs the transformers forward.

    python scripts/distill_speed.py --prompts 256 --max-new-tokens 192 --batch 64 128 --engines static hf \\
        --json scripts/results/default_cpu/distill_speed.json

The same ShareGPT prompts (a seeded sample of the filtered first turns), the default model, fp32, greedy, in one
run. Reports generated tokens/s (what the issue's target counts) and prompt tokens/s, with the split of wall
time between prefill and decode steps for the static engine. Add ``--device cuda`` on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter

import numpy as np
import torch

from medusa_export.exporter.model_loading import load_base_model
from medusa_export.exporter.training import data as data_mod
from medusa_export.exporter.training.prompt_source import load_prompt_set
from medusa_export.exporter.training.static_decoder import StaticDecoder
from script_io import run_main, with_machine, writable, write_json  # noqa: E402


def _timed(cls, name: str, spent: Counter):
    real = getattr(cls, name)

    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        out = real(*a, **kw)
        spent[name] += time.perf_counter() - t0
        return out

    setattr(cls, name, wrapper)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--batch", type=int, nargs="+", default=[64, 128])
    p.add_argument("--engines", nargs="+", default=["static", "hf"], choices=["static", "hf"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=writable, default=None)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(a.threads)
    loaded = load_base_model(None)
    model = loaded.model.to(a.device).eval()
    pool = load_prompt_set("sharegpt").prompts
    pick = np.random.default_rng(a.seed).choice(len(pool), a.prompts, replace=False)
    prompts = [pool[i] for i in sorted(pick)]
    encoded = [loaded.tokenizer.encode_prompt(x) for x in prompts]
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    eos = set(loaded.tokenizer.eos_token_ids)
    spent: Counter = Counter()
    _timed(StaticDecoder, "prefill", spent)
    _timed(StaticDecoder, "step", spent)
    rows = []
    for engine in a.engines:
        for batch in a.batch:
            spent.clear()
            cfg = data_mod.DistillConfig(max_new_tokens=a.max_new_tokens, batch_size=batch, engine=engine)
            t0 = time.perf_counter()
            generated = sum(len(tokens) for _, _, tokens in data_mod._answers(model, encoded, order, eos, cfg))
            wall = time.perf_counter() - t0
            row = {"engine": engine, "batch": batch, "prompts": len(encoded), "device": a.device,
                   "prompt_tokens": int(sum(map(len, encoded))), "generated_tokens": generated,
                   "wall_s": round(wall, 1), "generated_tokens_per_s": round(generated / wall, 1),
                   "prefill_s": round(spent["prefill"], 1) if engine == "static" else None,
                   "step_s": round(spent["step"], 1) if engine == "static" else None}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.json:
        write_json(a.json, with_machine({"threads": a.threads, "max_new_tokens": a.max_new_tokens,
                                         "rows": rows}), indent=2)


if __name__ == "__main__":
    run_main(main)
