"""How a step's row budget is shared among the prompts going in (chunked prefill): max-min fair shares."""

from __future__ import annotations


def fair_shares(remaining: list[int], budget: int) -> list[int]:
    """Rows of a step's budget for each prompt still going in: equal shares, a prompt needing less than its share
    taking only what it needs and leaving the rest to the others (max-min fair). A short prompt arriving during a
    long one's prefill goes in at once instead of after it, and no prompt is starved by later ones."""
    shares = [0] * len(remaining)
    for k, i in enumerate(sorted(range(len(remaining)), key=lambda i: (remaining[i], -i))):  # ties: earlier first
        shares[i] = min(remaining[i], max(budget, 0) // (len(remaining) - k))
        budget -= shares[i]
    return shares
