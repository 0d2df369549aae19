"""Replay the runtime's own decode loop (`decode.decode`, `decode.plan`, `Speculation`) on the model's greedy answers,
drafts only (no heads), with a session that answers each row from the known answer, and score ways of choosing the
draft: tokens per step, and speed-up over plain decoding by a step-cost table measured on the artifact.

    python scripts/plan_replay.py artifacts/smollm2 --prompts train_prompts.jsonl --first 100 --count 60 \\
        [--answers answers.json] [--costs-ms 22.7,24.4,25.6,...] [--json out.json]

The answers (greedy, the vanilla graph, chat template, 128 new tokens) are decoded once and kept in ``--answers``.
The step-cost table (ms by rows, 1..9) is measured on the artifact's vanilla graph at past 256 unless given. No step
runs during the replay, so every choice is scored on the same tokens and the same costs:

- ``runtime``: what the runtime does (the context's or the corpus table's draft, whichever expects more);
- ``context`` / ``corpus``: one source alone;
- ``oracle``: the source whose draft the answer takes further (a bound on choosing between the two);
- ``per-token``: each corpus draft token's acceptance class from its own lookup (n-gram length, share), not the
  first token's;
- ``agree``: a class of its own when the two sources agree on the first token;
- ``context-ngram-5``: prompt lookup matching up to 5 tokens instead of 3;
- ``pair``: when both sources draft, rates per pair of their classes (and whether their first tokens agree), both
  drafts scored against the answer at every such step (the runtime would score the one not verified once the tokens
  after it are known, as it does the heads' guesses), the single-kind rates as a prior of 10 observations.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from medusa_export.runtime import decode, speculation
from medusa_export.runtime.api import MedusaRuntime
from medusa_export.runtime.backends.base import StepOutput
from medusa_export.runtime.context_drafts import ContextIndex, Draft
from medusa_export.runtime.corpus_drafts import CorpusTable, rate_kind
from medusa_export.runtime.decode import GenerationConfig

sys.path.insert(0, str(Path(__file__).parent))
from script_io import non_negative, positive, prompt_rows, run_main, with_machine, writable, write_json  # noqa: E402
from step_latency import time_step  # noqa: E402

EXTRA_KINDS = 4  # classes past the runtime's, for the variants that add some
MAX_ROWS = 9  # the most rows a drafts-only step verifies (the root and 8 drafts)
MAX_DRAFT = MAX_ROWS - 1
PAIR_PRIOR = 10.0  # the ``pair`` variant: the single-kind rates count as this many observations


class ReplaySession:
    """A session whose every row's argmax is the answer's next token where the row's path matches the answer so far
    (-1, which matches no token, elsewhere): what greedy verification of that row would give."""

    def __init__(self, sequence: list[int]) -> None:
        self.sequence, self.capacity, self.length, self.rows = sequence, 1 << 20, 0, []

    def run(self, tokens, positions, mask, medusa, temperature, out_rows=None) -> StepOutput:
        tokens = np.asarray(tokens)
        nxt = np.full((len(tokens), 1), -1, np.int64)
        for r in range(len(tokens)):
            path = tokens[np.flatnonzero(mask[r])].tolist()
            end = self.length + len(path)
            if end < len(self.sequence) and self.sequence[self.length:end] == path:
                nxt[r, 0] = self.sequence[end]
        nxt = nxt if out_rows is None else nxt[np.asarray(out_rows)]
        self.rows.append(len(tokens))
        zeros = np.zeros((len(nxt), 1), np.float32)
        return StepOutput(nxt, zeros, np.zeros((len(nxt), len(tokens)), np.float32), zeros[:, 0], None)

    def keep(self, rows) -> None:
        self.length += len(rows)


class TokenRates(speculation.AcceptanceRates):
    """The runtime's rates, also for a draft whose kind is a tuple: token j scored in the class of its own lookup, at
    depth j (the ``per-token`` variant)."""

    def cumulative(self, kind, n: int) -> list[float]:
        if not isinstance(kind, tuple):
            return super().cumulative(kind, n)
        out, p = [], 1.0
        for j in range(min(n, len(kind))):
            p *= self.conditional[kind[j]][j]
            out.append(p)
        return out

    def record(self, kind, proposed: int, accepted: int, start: int = 0) -> None:
        if not isinstance(kind, tuple):
            return super().record(kind, proposed, accepted, start)
        for j in range(start, min(accepted + 1, proposed, len(kind))):
            acc, prop = self._accepted[kind[j]], self._proposed[kind[j]]
            prop[j] += 1
            acc[j] += j < accepted
            row = list(self.conditional[kind[j]])
            row[j] = acc[j] / prop[j]
            self.conditional[kind[j]] = row


class ReplaySpeculation(speculation.Speculation):
    """The runtime's speculation state with a fixed step-cost table and a draft chooser given by the variant."""

    def __init__(self, costs_s: list[float], corpus: CorpusTable, variant: str) -> None:
        super().__init__()
        self.corpus, self.variant, self.truth = corpus, variant, []
        self.pair_counts = defaultdict(lambda: ([0.0] * MAX_DRAFT, [0.0] * MAX_DRAFT))  # accepted, tried by depth
        self.rates = TokenRates()
        self.rates.conditional += [[0.5] * len(self.rates.conditional[0]) for _ in range(EXTRA_KINDS)]
        self.rates._accepted += [[5.0] * len(row) for row in self.rates.conditional[-EXTRA_KINDS:]]
        self.rates._proposed += [[10.0] * len(row) for row in self.rates.conditional[-EXTRA_KINDS:]]
        cost = self.alone_cost[False]
        for rows, s in enumerate(costs_s, 1):
            cost.seconds[rows], cost.count[rows] = s, speculation.PLAIN_MIN
        cost.records = 1
        cost.record = lambda rows, seconds: None  # the table stays as given

    def propose_both(self, context: ContextIndex, max_tokens: int) -> tuple[Draft | None, None]:
        return self.propose(context, max_tokens), None  # the variant's choice; no other source's draft is watched

    def propose(self, context: ContextIndex, max_tokens: int) -> Draft | None:
        toks, v = context.tokens, self.variant
        first = context.propose(max_tokens) if v != "corpus" else None
        if v == "context-ngram-5":
            first = ContextIndex(toks, max_ngram=5).propose(max_tokens)
            if first is not None and first.ngram > 3:
                first = Draft(first.tokens, first.ngram, len(self.rates.conditional) - EXTRA_KINDS + first.ngram - 4)
        second = None if v == "context" else per_token(self.corpus, toks, max_tokens) if v == "per-token" else \
            self.corpus.propose(toks, max_tokens)
        drafts = [d for d in (first, second) if d is not None]
        if not drafts:
            return None
        if v == "pair" and first is not None and second is not None:
            return self._pair_choice(first, second, self.truth[len(toks):len(toks) + max_tokens])
        if v == "oracle":
            future = self.truth[len(toks):len(toks) + max_tokens]
            return max(drafts, key=lambda d: decode.agreeing(d.tokens, future))
        best = max(drafts, key=lambda d: sum(self.rates.cumulative(d.rate_kind, len(d.tokens))))
        if v == "agree" and first is not None and second is not None and first.tokens[0] == second.tokens[0]:
            return Draft(best.tokens, best.ngram, len(self.rates.conditional) - EXTRA_KINDS)
        return best


    def _pair_choice(self, context: Draft, corpus: Draft, future: list[int]) -> Draft:
        """The draft expecting more accepted tokens by the rates of this pair of classes; both then scored."""
        pair = (context.rate_kind, corpus.rate_kind, context.tokens[0] == corpus.tokens[0])
        expected = []
        for source, draft in enumerate((context, corpus)):
            key, prior, p, total = (*pair, source), self.rates.conditional[draft.rate_kind], 1.0, 0.0
            counts = self.pair_counts[key]
            for j in range(len(draft.tokens)):
                p *= (counts[0][j] + PAIR_PRIOR * prior[j]) / (counts[1][j] + PAIR_PRIOR)
                total += p
            expected.append(total)
            right = decode.agreeing(draft.tokens, future)
            for j in range(min(right + 1, len(draft.tokens))):
                counts[1][j] += 1
                counts[0][j] += j < right
        return context if expected[0] >= expected[1] else corpus


def per_token(table: CorpusTable, tokens: list[int], max_tokens: int) -> Draft | None:
    """The table's draft with each token's class from its own lookup (a tuple of kinds)."""
    suffix, out, kinds, longest = list(tokens[-table.max_ngram:]), [], [], None
    for _ in range(max_tokens):
        found = table.lookup(suffix, longest)
        if found is None:
            break
        out.append(found[0])
        kinds.append(rate_kind(found[1], found[2]))
        suffix, longest = (suffix + [found[0]])[-table.max_ngram:], found[1] + 1
    return Draft(out, 0, tuple(kinds)) if out else None


def replay(answers: list[dict], spec: ReplaySpeculation, costs_s: list[float]) -> dict:
    """Tokens per step and the speed-up over one token a step, by the cost table, over every answer."""
    tokens = seconds = steps = 0
    for a in answers:
        spec.truth = a["prompt_ids"] + a["ids"]
        session = ReplaySession(spec.truth)
        made = 0
        for new in decode.decode(session, a["prompt_ids"], None, GenerationConfig(), decode.DecodeStats(), spec):
            made += len(new)
            if made >= len(a["ids"]):
                break
        rows = session.rows[1:]  # after the prefill
        tokens += len(a["ids"]) - 1
        seconds += sum(costs_s[min(r, len(costs_s)) - 1] for r in rows)
        steps += len(rows)
    return {"tokens": tokens, "steps": steps, "tokens_per_step": round(tokens / steps, 3) if steps else None,
            "speedup": round(tokens * costs_s[0] / seconds, 3) if seconds else None}


def greedy_answers(rt: MedusaRuntime, prompts: list[str], max_new_tokens: int) -> list[dict]:
    out = []
    for p in prompts:
        ids = rt.generator.prompt_ids(p, GenerationConfig(medusa=False))
        r = rt.generate(ids, max_new_tokens=max_new_tokens, medusa=False)
        out.append({"prompt_ids": ids, "ids": list(map(int, r.token_ids))})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--first", type=non_negative, default=0)
    ap.add_argument("--count", type=positive, default=60)
    ap.add_argument("--max-new-tokens", type=positive, default=128)
    ap.add_argument("--answers", type=Path, help="greedy answers, read if the file exists, else decoded and written")
    ap.add_argument("--costs-ms", help="step ms by rows 1..9, comma-separated; measured on the artifact if absent")
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--json", type=writable)
    args = ap.parse_args()
    costs = None
    if args.costs_ms:
        try:
            costs = [float(x) / 1e3 for x in args.costs_ms.split(",")]
        except ValueError:
            ap.error(f"--costs-ms {args.costs_ms!r}: comma-separated numbers of ms")
        if len(costs) != MAX_ROWS or not all(0 < c < float("inf") for c in costs):
            ap.error(f"--costs-ms: {MAX_ROWS} positive numbers (step ms by rows 1..{MAX_ROWS}), got {args.costs_ms!r}")
    prompts = None
    if not (args.answers and args.answers.exists()):  # read before the model loads: a bad file fails at once
        prompts = prompt_rows(args.prompts, args.first, args.count)
        if not prompts:
            ap.error(f"--first {args.first} is past the last prompt of {args.prompts}")
    rt = MedusaRuntime.load(args.artifact, backend="ort", threads=args.threads)
    corpus = rt.generator.spec.corpus
    if corpus is None:  # checked before the answers are decoded, not after
        raise SystemExit(f"{args.artifact} has no corpus-draft table (corpus_drafts.npz): build it with one")
    if prompts is None:
        answers = json.loads(args.answers.read_text())
    else:
        answers = greedy_answers(rt, prompts, args.max_new_tokens)
        if args.answers:
            write_json(args.answers, answers, indent=None)  # whole or not at all: a later run reads it back
    if costs is None:
        costs = [time_step(rt.generator.backend, t, 256, False, 15) / 1e3 for t in range(1, MAX_ROWS + 1)]
    rt.close()
    report = {"artifact": str(args.artifact), "prompts": f"{args.prompts.name}[{args.first}:{args.first + args.count}]",
              "costs_ms": [round(c * 1e3, 2) for c in costs], "variants": {}}
    for variant in ("runtime", "context", "corpus", "oracle", "per-token", "agree", "context-ngram-5", "pair"):
        corpus._cache.clear()
        report["variants"][variant] = row = replay(answers, ReplaySpeculation(costs, corpus, variant), costs)
        print(f"{variant:16s} {row}", flush=True)
    if args.json:
        write_json(args.json, with_machine(report))


if __name__ == "__main__":
    run_main(main)
