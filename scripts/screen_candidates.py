"""How many words the screened lm_head (`build --lm-head screened`, docs/graphs.md) computes exactly, on the default
model's real hidden states: per position of the fp32 model's greedy answers to held-out prompts, the words whose
error bound from the int8 product lets them rank among the top 1 / 10 / 32, and the largest error of the int8
product as a share of its bound (below 1: the bound held). The int8 product as the graph computes it: the row in
two passes (`RowQuantize` passes = 2), the weight per word (`exporter/quantize_rows.column_scale`, `nearest_int8`).

    python scripts/screen_candidates.py --prompts train_prompts.jsonl --first 40 --count 8 [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from medusa_export.exporter.model_loading import load_base_model
from medusa_export.exporter.quantize_rows import column_scale, nearest_int8
from medusa_export.runtime.machine import machine_info
from script_io import non_negative, positive, prompt_rows, run_main, with_machine, writable, write_json  # noqa: E402


def two_passes(x: np.ndarray) -> np.ndarray:
    """Each row as RowQuantize's two passes hold it (float64)."""
    held = np.zeros_like(x)
    for _ in range(2):
        rest = x - held
        step = np.abs(rest).max(axis=-1, keepdims=True) / 127
        step[step == 0] = 1
        held = held + np.rint(rest / step) * step
    return held


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--first", type=non_negative, default=40)
    ap.add_argument("--count", type=positive, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--json", type=writable, default=None)
    args = ap.parse_args()
    loaded = load_base_model(None)
    model, tok = loaded.model.eval(), loaded.tokenizer
    hidden = []
    with torch.no_grad():
        for text in prompt_rows(args.prompts, args.first, args.count):
            ids = torch.tensor([tok.encode_prompt(text)])
            answer = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
            hidden.append(model.model(answer).last_hidden_state[0].double().numpy())
    x = np.concatenate(hidden)
    w = model.lm_head.weight.detach().double().numpy()  # [V, H]
    scale = column_scale(w.T.astype(np.float32))
    w_held = (nearest_int8(w.T.astype(np.float32), scale).astype(np.float64) * scale.astype(np.float64)).T
    x_held = two_passes(x)
    exact, approx = x @ w.T, x_held @ w_held.T
    bound = (np.linalg.norm(x - x_held, axis=1, keepdims=True) * np.linalg.norm(w, axis=1)[None]
             + np.linalg.norm(x_held, axis=1, keepdims=True) * np.linalg.norm(w - w_held, axis=1)[None])
    result = {"machine": machine_info(), "args": vars(args), "positions": int(x.shape[0]),
              "max_error_over_bound": float((np.abs(exact - approx) / bound).max())}
    for top in (1, 10, 32):
        floor = np.sort(approx - bound, axis=1)[:, -top]
        kept = ((approx + bound) >= floor[:, None]).sum(axis=1)
        result[f"top_{top}"] = {"median": float(np.median(kept)), "p90": float(np.percentile(kept, 90)),
                                "max": int(kept.max())}
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}))
    if args.json:
        write_json(args.json, with_machine(result), indent=1)


if __name__ == "__main__":
    run_main(main)
