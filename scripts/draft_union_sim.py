"""How many drafted tokens a greedy answer would accept per step from the context (prompt lookup), from the
artifact's corpus table, from the one of the two the runtime picks, and from both verified together, replayed on the
model's own greedy answers: no step runs, so it says what a second draft chain could gain before any step pays
for it. The heads are left out (they need the model's states).

    python scripts/draft_union_sim.py artifacts/smollm2 --prompts train_prompts.jsonl --first 160 --count 40 \\
        [--max-new-tokens 128] [--max-draft 8] [--answers answers.json]

Each step starts where the previous one's accepted drafts (of the draft the runtime picks) and the base model's own
token left the answer, as the runtime's steps do; at every such position each source's draft is scored by how many
of its tokens the answer takes. The picking learns the sources' acceptance rates as the replay goes, as the runtime
learns them from its steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medusa_export.runtime.api import MedusaRuntime
from medusa_export.runtime.context_drafts import ContextIndex, Draft
from medusa_export.runtime.decode import agreeing
from medusa_export.runtime.speculation import Speculation
from script_io import non_negative, positive, prompt_rows, run_main, write_json  # noqa: E402


def taken(draft: Draft | None, answer: list[int]) -> int:
    """How many of the draft's first tokens equal the answer's (`decode.agreeing`, as the runtime counts them)."""
    return agreeing(draft.tokens, answer) if draft else 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--first", type=non_negative, default=160)
    ap.add_argument("--count", type=positive, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-draft", type=int, default=8)
    ap.add_argument("--answers", help="a JSON file of [prompt ids, answer ids] pairs: read if it exists, else written")
    args = ap.parse_args()
    cached = Path(args.answers) if args.answers else None
    with MedusaRuntime.load(args.artifact) as rt:
        if cached and cached.exists():
            pairs = json.loads(cached.read_text())
        else:
            pairs = []
            for prompt in prompt_rows(args.prompts, args.first, args.count):
                ids = rt.generator.tokenizer.encode_prompt(prompt)
                pairs.append([ids, rt.generate(ids, max_new_tokens=args.max_new_tokens).token_ids])
            if cached:
                write_json(cached, pairs, indent=None)  # whole: a later run reads it back
        corpus = rt.generator.spec.corpus
    spec = Speculation()  # rates from the priors, learned as the replay goes
    spec.corpus = corpus
    totals = {"steps": 0, "context": 0, "corpus": 0, "picked": 0, "union": 0, "both_drafted": 0, "differ": 0,
              "union_rows": 0, "picked_rows": 0}
    for prompt, answer in (pair for pair in pairs if pair[1]):
        context = ContextIndex([*prompt, answer[0]])
        i = 1  # the first token comes from the prefill
        while i < len(answer):
            rest = answer[i:]
            ctx = context.propose(args.max_draft)
            cor = spec.corpus.propose(context.tokens, args.max_draft) if spec.corpus is not None else None
            picked = spec.propose(context, args.max_draft)
            a_ctx, a_cor, a_pick = taken(ctx, rest), taken(cor, rest), taken(picked, rest)
            totals["steps"] += 1
            totals["context"] += a_ctx
            totals["corpus"] += a_cor
            totals["picked"] += a_pick
            totals["union"] += max(a_ctx, a_cor)
            totals["picked_rows"] += len(picked.tokens) if picked else 0
            if ctx and cor:
                totals["both_drafted"] += 1
                totals["differ"] += ctx.tokens[0] != cor.tokens[0]
                shared = taken(ctx, cor.tokens)
                totals["union_rows"] += len(ctx.tokens) + len(cor.tokens) - shared
            else:
                totals["union_rows"] += len((ctx or cor).tokens) if (ctx or cor) else 0
            if picked:
                spec.rates.record(picked.rate_kind, len(picked.tokens), a_pick)
            step = a_pick + 1  # the replay follows the picked draft, as the runtime would
            context.extend(answer[i:i + step])
            i += step
    steps = totals["steps"]
    per_step = {f"{k}_per_step": round(v / steps, 3) for k, v in totals.items() if k != "steps"}
    print(json.dumps({"artifact": args.artifact, "prompts": args.prompts, "first": args.first, "answers": len(pairs),
                      "max_draft": args.max_draft, "steps": steps, **per_step}))


if __name__ == "__main__":
    run_main(main)
