"""Log-probabilities of an answer's tokens and of the best alternatives at each (OpenAI's ``logprobs``).

    entries = step_logprobs(out, accepted=[0, 3], tokens=[17, 42], top=2)   # one `TokenLogprob` per token

A step makes final the tokens of its accepted nodes after the root, then the base model's own token; each was chosen
from the row of the accepted node before it (the last accepted node's row for the base model's token). Values are
the row's probabilities: at the request's temperature (1 when greedy), before top_p and top_k. A tree node is
computed as the same token in a one-token step is (docs/graphs.md), so speculation leaves them as vanilla decoding
gives them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_TOP_LOGPROBS = 20  # alternatives per token: OpenAI's limit (top_logprobs), and vLLM's default max_logprobs
FLOOR = -9999.0  # the log of a probability that underflowed float32 (vLLM's stand-in for -inf, which JSON cannot hold)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the row's best (token id, logprob), best first: as many as asked


def step_logprobs(out, accepted: list[int], tokens: list[int], top: int) -> list[TokenLogprob]:
    """The entries of ``tokens``, made final by one step whose accepted nodes are ``accepted`` (root first; after a
    prompt, its last row alone): token k was chosen from row ``accepted[k]``."""
    entries = []
    for k, (row, token) in enumerate(zip(accepted, tokens)):
        ids, probs = out.next_ids[row], out.next_probs[row]
        hit = np.flatnonzero(ids == token)
        if hit.size:
            p = probs[hit[0]]
        elif k + 1 < len(accepted):  # a draft typical acceptance took from beyond the row's top-S ranks
            p = out.input_probs[row, accepted[k + 1]]
        else:  # the base model's own token is drawn from the top-S ranks: never here
            raise ValueError(f"token {token} is not among row {row}'s {len(ids)} best")
        entries.append(TokenLogprob(int(token), _log(p), tuple((int(i), _log(q)) for i, q in zip(ids[:top], probs[:top]))))
    return entries


def _log(p) -> float:
    return float(np.log(np.float64(p))) if p > 0 else FLOOR


class FinalTokens(list):
    """The token ids one step made final (a list), with their `TokenLogprob` entries in ``logprobs`` when the request
    asked for them (`GenerationConfig.logprobs`), else None."""

    logprobs: list[TokenLogprob] | None = None


def final_tokens(out, accepted: list[int], tokens: list[int], top: int | None) -> FinalTokens:
    """``tokens`` as `FinalTokens`, with their entries when ``top`` (alternatives per token) is not None."""
    final = FinalTokens(tokens)
    if top is not None:
        final.logprobs = step_logprobs(out, accepted, tokens, top)
    return final
