"""Would a step's plan gain from knowing how confident the model is? A simulation on greedy answers.

The planner (`runtime/speculation.py`) weighs the heads' node and the context drafts by acceptance rates measured
per draft kind and depth, the same at every step. Two things a step could also know:
- the base model's probability of the root it just chose (``next_probs``, already an output of every step): does it
  predict whether the heads' guess or a draft will be accepted?
- whether the heads' first guess is right: an upper bound on what the heads' own confidence (a graph output they do
  not have) could add, were it perfectly calibrated.

Greedy answers are decoded one token a step on the Medusa graph (every row's heads known), then steps are replayed
offline: at each position the options are the root alone, the root and head 0's first guess, or the root and the
first n tokens of the context draft (`ContextIndex`); a policy picks the option with the most expected tokens per unit
of time, where a step of R rows costs 1 + c (R - 1) one-row steps, and earns the tokens greedy would accept. Rates are
fitted on the first half of the prompts and the policies scored on the second half.

    python scripts/confidence_planning_sim.py ARTIFACT --prompts train_prompts.jsonl --range 200:280 \\
        [--max-new-tokens 128] [--json confidence_planning.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from medusa_export.runtime.api import MedusaRuntime
from medusa_export.runtime.context_drafts import ContextIndex
from medusa_export.runtime.decode import GenerationConfig, prefill
from medusa_export.runtime.machine import machine_info
from script_io import prompt_rows, run_main, span, with_machine, writable, write_json  # noqa: E402

CONFIDENCE_EDGES = [0.0, 0.5, 0.8, 0.95, 1.01]  # buckets of the root's probability
ROW_COSTS = (0.06, 0.15, 0.25, 0.37)  # a further row's share of a one-row step (fp32 MatMul ... int4 rows16)
MAX_NGRAM_KIND = 3


def decode_answers(artifact: str, prompts: list[str], max_new_tokens: int) -> list[dict]:
    """Greedy answers, one token a step on the Medusa graph: per position the root's probability and the heads'
    first guesses."""
    rt = MedusaRuntime.load(artifact, threads=2)
    gen, backend = rt.generator, rt.generator.backend
    cfg = GenerationConfig(max_new_tokens=max_new_tokens)
    answers = []
    for text in prompts:
        ids = gen.prompt_ids(text, cfg)
        with backend.new_session() as s:
            cursor = prefill(s, ids, True, cfg, np.random.default_rng(0))
            tokens, root_p, heads = [cursor.root], [None], [cursor.heads[:, 0].tolist()]
            while len(tokens) < max_new_tokens and tokens[-1] not in gen.tokenizer.eos_token_ids:
                if s.length + 1 > s.capacity:
                    break
                out = s.run(np.array([tokens[-1]]), np.array([s.length]), np.ones((1, 1), bool), True, 1.0)
                s.keep(np.array([0]))
                tokens.append(int(out.next_ids[0, 0]))
                root_p.append(float(out.next_probs[0, 0]))
                heads.append(out.medusa_ids[0][:, 0].tolist())
        answers.append({"prompt": ids, "tokens": tokens, "root_p": root_p, "heads": heads})
    rt.close()
    return answers


def positions(answers: list[dict]) -> list[dict]:
    """Every position after the first: the root's probability, whether head 0's guess is right, the context draft
    and how many of its tokens greedy would accept."""
    out = []
    for a in answers:
        t = a["tokens"]
        index = ContextIndex([*a["prompt"], t[0]])
        for j in range(1, len(t) - 1):
            index.extend([t[j]])
            draft = index.propose(8)
            accepted = 0
            if draft:
                for x, y in zip(draft.tokens, t[j + 1:]):
                    if x != y:
                        break
                    accepted += 1
            out.append({"p": a["root_p"][j], "head_right": a["heads"][j][0] == t[j + 1], "draft": draft,
                        "draft_accepted": accepted})
    return out


def bucket(p: float, buckets: int) -> int:
    return int(np.digitize(p, CONFIDENCE_EDGES) - 1) if buckets > 1 else 0


def fit(steps: list[dict], buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Head 0's acceptance and the drafts' conditional acceptance by (n-gram kind, depth), per confidence bucket
    (one bucket: the planner's rates), each with a prior of one accepted in two."""
    head = np.ones((buckets, 2)) * [1, 2]
    drafts = np.ones((buckets, MAX_NGRAM_KIND + 1, 8, 2)) * [1, 2]
    for s in steps:
        b = bucket(s["p"], buckets)
        head[b] += [s["head_right"], 1]
        if s["draft"]:
            kind = min(s["draft"].ngram, MAX_NGRAM_KIND)
            for depth in range(min(s["draft_accepted"] + 1, len(s["draft"].tokens))):
                drafts[b, kind, depth] += [depth < s["draft_accepted"], 1]
    return head[:, 0] / head[:, 1], drafts[..., 0] / drafts[..., 1]


def score(steps: list[dict], rates, buckets: int, c: float, oracle: bool = False) -> dict:
    """Tokens per unit of time (one-row steps) and tokens per step of the policy; ``oracle``: head 0 is taken exactly
    when it is right."""
    head, drafts = rates
    tokens = time_units = 0.0
    for s in steps:
        b = bucket(s["p"], buckets)
        cost = lambda rows: 1 + c * (rows - 1)  # noqa: E731
        options = [(1.0, 1, 0, False)]  # (expected tokens, rows, draft tokens, head)
        if not oracle:
            options.append((1 + head[b], 2, 0, True))
        elif s["head_right"]:
            options.append((2.0, 2, 0, True))
        if s["draft"]:
            expected, p = 1.0, 1.0
            for n in range(1, len(s["draft"].tokens) + 1):
                p *= drafts[b, min(s["draft"].ngram, MAX_NGRAM_KIND), n - 1]
                expected += p
                options.append((expected, n + 1, n, False))
        _, rows, n, use_head = max(options, key=lambda o: o[0] / cost(o[1]))
        tokens += 1 + (s["head_right"] if use_head else min(n, s["draft_accepted"]))
        time_units += cost(rows)
    return {"tokens_per_unit": round(tokens / time_units, 4), "tokens_per_step": round(tokens / len(steps), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--range", type=span, default="200:280",
                    help="lo:hi rows of the prompt file (never MT-Bench: this tunes)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--json", type=writable)
    args = ap.parse_args()
    lo, hi = args.range
    prompts = prompt_rows(args.prompts, lo, hi - lo)
    t0 = time.perf_counter()
    answers = decode_answers(args.artifact, prompts, args.max_new_tokens)
    half = len(answers) // 2
    tune, test = positions(answers[:half]), positions(answers[half:])
    calibration = []
    for b in range(len(CONFIDENCE_EDGES) - 1):
        group = [s for s in tune + test if bucket(s["p"], len(CONFIDENCE_EDGES) - 1) == b]
        with_draft = [s for s in group if s["draft"]]
        calibration.append({"root_p": CONFIDENCE_EDGES[b:b + 2], "positions": len(group),
                            "head0_right": round(float(np.mean([s["head_right"] for s in group])), 3) if group else None,
                            "draft_first_accepted": round(float(np.mean([s["draft_accepted"] > 0 for s in with_draft])), 3)
                            if with_draft else None})
    policies = []
    for c in ROW_COSTS:
        planner = score(test, fit(tune, 1), 1, c)
        by_confidence = score(test, fit(tune, len(CONFIDENCE_EDGES) - 1), len(CONFIDENCE_EDGES) - 1, c)
        oracle = score(test, fit(tune, 1), 1, c, oracle=True)
        policies.append({"row_cost": c, "planner": planner, "by_root_confidence": by_confidence, "head_oracle": oracle,
                         "gain_by_confidence": round(by_confidence["tokens_per_unit"] / planner["tokens_per_unit"], 4),
                         "gain_head_oracle": round(oracle["tokens_per_unit"] / planner["tokens_per_unit"], 4)})
    report = {"artifact": args.artifact, "prompts": str(args.prompts), "range": f"{lo}:{hi}",
              "positions": {"tune": len(tune), "test": len(test)}, "calibration": calibration, "policies": policies,
              "seconds": round(time.perf_counter() - t0, 1), "machine": machine_info()}
    print(json.dumps({k: report[k] for k in ("positions", "calibration", "policies")}, indent=1))
    if args.json:
        write_json(args.json, with_machine(report), indent=2)


if __name__ == "__main__":
    run_main(main)
