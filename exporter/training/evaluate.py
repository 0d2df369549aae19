"""Held-out accuracy of Medusa heads over the full vocabulary, as decoding will see them.

    acc = evaluate_heads(heads, lm_weight, held)   # {"top1": [...], "top5": [...], "chain_accept": ...}
    print(format_table(acc))

``chain_accept`` is the mean number of tokens a greedy chain tree (one node per head) would emit per step:
1 (the base model's own token) + the number of leading heads whose top-1 guess is right.
"""

from __future__ import annotations

import numpy as np
import torch

from medusa_export.exporter.heads import MedusaHeads

from .examples import IGNORE, Examples


@torch.no_grad()
def evaluate_heads(heads: MedusaHeads, lm_weight: torch.Tensor, ex: Examples, batch_size: int = 512,
                   device: torch.device | str = "cpu") -> dict:
    K = heads.config.num_heads
    if len(ex) == 0:
        return {"positions": 0, "top1": [None] * K, "top5": [None] * K, "chain_accept": None}
    heads.eval()
    hit1 = np.zeros(K)
    hit5 = np.zeros(K)
    count = np.zeros(K)
    chain = 0.0
    for s in range(0, len(ex), batch_size):
        h = torch.as_tensor(ex.hidden[s:s + batch_size], device=device).float()
        tgt = torch.as_tensor(ex.targets[s:s + batch_size], device=device)  # [b, K]
        logits = heads.hidden(h) @ lm_weight.T  # [b, K, V]
        top5 = logits.topk(5, dim=-1).indices  # [b, K, 5]
        valid = tgt != IGNORE
        ok1 = (top5[..., 0] == tgt) & valid
        ok5 = (top5 == tgt.unsqueeze(-1)).any(-1) & valid
        hit1 += ok1.sum(0).cpu().numpy()
        hit5 += ok5.sum(0).cpu().numpy()
        count += valid.sum(0).cpu().numpy()
        chain += float((1 + ok1.long().cumprod(dim=1).sum(1)).sum())
    heads.train()
    r = lambda x: round(float(x), 4)  # noqa: E731
    return {
        "positions": int(len(ex)),
        "top1": [r(a / c) if c else None for a, c in zip(hit1, count)],
        "top5": [r(a / c) if c else None for a, c in zip(hit5, count)],
        "chain_accept": r(chain / len(ex)),
    }


def format_table(acc: dict) -> str:
    lines = ["head  top-1   top-5", "----  ------  ------"]
    for k, (a1, a5) in enumerate(zip(acc["top1"], acc["top5"])):
        f = lambda x: "   n/a" if x is None else f"{x:6.3f}"  # noqa: E731
        lines.append(f"{k + 1:>4}  {f(a1)}  {f(a5)}")
    if acc.get("chain_accept") is not None:
        lines.append(f"mean tokens/step with a {len(acc['top1'])}-node chain: {acc['chain_accept']:.3f}"
                     f"  ({acc['positions']} held-out positions)")
    return "\n".join(lines)
