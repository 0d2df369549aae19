"""Quality of a quantized artifact against its full-precision reference, on real text.

    q = quality(reference_generator, quantized_generator, prompts, max_new_tokens=64)   # a QualityRecord
    q.top1_agreement, q.perplexity_change, q.passes

For each prompt the reference answers greedily; both then read prompt + answer in one teacher-forced pass.
``top1_agreement``: the fraction of answer positions where both predict the same next token.
``perplexity``: exp of the mean negative log-probability each gives the answer's tokens (the reference's own
answers, so the reference's perplexity is low; what matters is the change). Build stores this in the manifest
and `verify` reports it; the bar a quantized artifact must meet is `TOP1_BAR`.
"""

from __future__ import annotations

import math

import numpy as np

from .compare import teacher_forced
from .generation_config import GenerationConfig
from .errors import InputError
from .generator import Generator
from .manifest import QualityRecord

QUALITY_NEW_TOKENS = 64  # the reference's answer per prompt, teacher-forced through both graphs
TOP1_BAR = 0.98  # teacher-forced top-1 agreement a quantized artifact needs with its fp32 reference


def quality(reference: Generator, candidate: Generator, prompts: list[str],
            max_new_tokens: int = QUALITY_NEW_TOKENS) -> QualityRecord:
    """``candidate`` against ``reference`` on the reference's greedy answers to ``prompts`` (see the module)."""
    if not prompts:
        raise InputError("there are no quality prompts: give at least one prompt to measure the quality on")
    agree = total = 0
    nll = {"reference": 0.0, "candidate": 0.0}
    room = min(reference.backend.max_seq, candidate.backend.max_seq)
    for prompt in prompts:
        prompt_ids = reference.tokenizer.encode_prompt(prompt)
        answer = reference.generate(prompt_ids, GenerationConfig(max_new_tokens=max_new_tokens, medusa=False)).token_ids
        # An answer that ran to the KV capacity ends with one token more than fits: its last token has no position.
        ids = (prompt_ids + answer)[:room]
        if len(ids) <= len(prompt_ids):
            continue
        rows = np.arange(len(prompt_ids) - 1, len(ids) - 1)  # positions that predict the answer's tokens
        outs = {"reference": teacher_forced(reference, ids), "candidate": teacher_forced(candidate, ids)}
        agree += int(np.sum(outs["reference"].next_ids[rows, 0] == outs["candidate"].next_ids[rows, 0]))
        total += len(rows)
        for name, out in outs.items():
            p = out.input_probs[rows, rows + 1].astype(np.float64)  # p_i(token i + 1)
            nll[name] -= float(np.log(np.maximum(p, 1e-30)).sum())
    if not total:
        raise InputError(f"the reference answered none of the {len(prompts)} quality prompts with a token: pass "
                         f"other prompts")
    return _record(len(prompts), total, agree, nll, max_new_tokens)


def _record(prompts: int, total: int, agree: int, nll: dict[str, float], max_new_tokens: int) -> QualityRecord:
    """The QualityRecord of ``agree`` of ``total`` answer positions and each graph's summed negative log-likelihood."""
    ppl = {k: math.exp(v / total) for k, v in nll.items()}
    return QualityRecord(prompts=prompts, positions=total, max_new_tokens=max_new_tokens,
                         top1_agreement=round(agree / total, 4), perplexity_reference=round(ppl["reference"], 4),
                         perplexity=round(ppl["candidate"], 4),
                         perplexity_change=round(ppl["candidate"] / ppl["reference"] - 1, 4), bar=TOP1_BAR,
                         passes=agree / total >= TOP1_BAR)
