"""Compare backends on real prompts: token agreement of full generations and per-position error.

    report = compare_backends({"torch": gen_a, "ort": gen_b}, prompts, max_new_tokens=64)

The first backend is the reference. For each prompt and mode (vanilla, Medusa) the greedy generations
must match token for token; then the reference's generated sequence is fed to every backend in one
teacher-forced forward, and the base model's top-1 agreement and the max abs error of its top-S
probabilities are reported per backend. The Medusa mode runs the heads' graph on every prompt (`generate_on_graph`);
without heads it is not run, and its counts are None rather than a match of nothing. Greedy Medusa is lossless, so
each backend's Medusa answers must also equal its own vanilla ones (``medusa_equals_vanilla``): a fault shared by the
decoding of both backends agrees across them and only shows there.
"""

from __future__ import annotations

import numpy as np

from .generation_config import GenerationConfig
from .errors import InputError
from .generator import Generator


def compare_backends(generators: dict[str, Generator], prompts: list[str], max_new_tokens: int = 64,
                     prob_tolerance: float = 1e-3) -> dict:
    """Per prompt and backend: identical greedy answers (vanilla, and Medusa on the heads' graph) and the
    teacher-forced agreement with the first (reference) backend; a summary per other backend (`backend_summary`)."""
    if not prompts:
        raise InputError("there are no prompts to compare the backends on: give at least one (--prompts FILE.jsonl, "
                         "--limit 1 or more)")
    if len(generators) < 2:
        raise InputError(f"comparing backends needs at least two, got {list(generators)}: name a reference and "
                         f"another (e.g. --backends torch,ort)")
    names = list(generators)
    seen: dict[int, str] = {}
    for n, g in generators.items():  # one backend under two names matches itself, whatever it computes
        first = seen.setdefault(id(g.backend), n)
        if first != n:
            raise InputError(f"{n!r} is the same backend as {first!r}: compare different backends (load each one)")
    ref_name = names[0]
    ref = generators[ref_name]
    rows = [_compare_prompt(generators, prompt, max_new_tokens) for prompt in prompts]
    summary = {"reference": ref_name, "prompts": len(prompts), "max_new_tokens": max_new_tokens,
               "prob_tolerance": prob_tolerance}
    if ref.tree is not None:  # greedy Medusa is lossless: the reference's own answers too
        summary["reference_medusa_equals_vanilla"] = sum(r["medusa_equals_vanilla"][ref_name] for r in rows)
    for n in names[1:]:
        summary[n] = backend_summary(rows, n, prob_tolerance, medusa=ref.tree is not None)
    return {"summary": summary, "rows": rows}


def _compare_prompt(generators: dict[str, Generator], prompt: str, max_new_tokens: int) -> dict:
    """One prompt's row: every backend's greedy answers against the reference's, then one teacher-forced forward
    of the reference's vanilla answer through every backend."""
    names = list(generators)
    ref_name, ref = names[0], generators[names[0]]
    row: dict = {"prompt": prompt[:60]}
    answers = {}
    for medusa in (False, True) if ref.tree is not None else (False,):
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, medusa=medusa)
        mode = "medusa" if medusa else "vanilla"
        outs = answers[mode] = {n: generate_on_graph(g, prompt, cfg) for n, g in generators.items()}
        row[f"{mode}_identical"] = {n: outs[n] == outs[ref_name] for n in names[1:]}
        row[f"{mode}_first_divergence"] = {n: _first_diff(outs[n], outs[ref_name]) for n in names[1:]}
    if "medusa" in answers:  # each backend's Medusa answer against its own vanilla one (greedy: the same tokens)
        row["medusa_equals_vanilla"] = {n: answers["medusa"][n] == answers["vanilla"][n] for n in names}
    # The reference's vanilla answer (not its Medusa one, which the last mode left behind), under the chat template
    # the answers were generated with.
    prompt_ids = ref.tokenizer.encode_prompt(prompt, chat=GenerationConfig().chat)
    # An answer that ran to the KV capacity ends with one token more than fits: its last token has no position.
    ids = (prompt_ids + answers["vanilla"][ref_name])[: min(g.backend.max_seq for g in generators.values())]
    row["teacher_forced_tokens"] = len(ids)
    # The positions that chose the answer's tokens (the last prompt row's at least), as `quality` scores them: a
    # long prompt's rows would outweigh the answer's in the top-1 agreement
    answer_rows = np.arange(len(prompt_ids) - 1, max(len(ids) - 1, len(prompt_ids)))
    row["answer_positions"] = len(answer_rows)
    forced = {n: teacher_forced(g, ids) for n, g in generators.items()}
    for n in names[1:]:
        a, b = forced[ref_name], forced[n]
        same = a.next_ids[:, 0] == b.next_ids[:, 0]
        row[f"{n}_top1_agreement"] = float(np.mean(same[answer_rows]))
        # Where the top-1 differs the probabilities are of different tokens; with no agreeing position at all
        # the error is unbounded: None (JSON has no infinity), and the top-1 agreement of 0 says why.
        row[f"{n}_max_prob_error"] = (float(np.abs(a.next_probs[same, 0] - b.next_probs[same, 0]).max())
                                      if same.any() else None)
    return row


def backend_summary(rows: list[dict], name: str, prob_tolerance: float, medusa: bool) -> dict:
    """One backend's counts over ``rows``: ``medusa_identical`` (and ``medusa_equals_vanilla``, its Medusa answers
    against its own vanilla ones) None when the Medusa mode did not run (no heads), ``max_prob_error`` None when some
    prompt had no position whose top-1 agreed (unbounded); either way not ok unless what was compared matched."""
    errors = [r[f"{name}_max_prob_error"] for r in rows]
    worst = None if any(e is None for e in errors) else float(max(errors))
    s = {"vanilla_identical": sum(r["vanilla_identical"][name] for r in rows),
         "medusa_identical": sum(r["medusa_identical"][name] for r in rows) if medusa else None,
         "medusa_equals_vanilla": sum(r["medusa_equals_vanilla"][name] for r in rows) if medusa else None,
         # over every answer position compared, as `quality` counts it: a short answer is not worth a long one
         "top1_agreement": float(np.average([r[f"{name}_top1_agreement"] for r in rows],
                                            weights=[r["answer_positions"] for r in rows])),
         "max_prob_error": worst}
    s["ok"] = (s["vanilla_identical"] == len(rows) and s["medusa_identical"] in (None, len(rows))
               and s["medusa_equals_vanilla"] in (None, len(rows)) and worst is not None and worst <= prob_tolerance)
    return s


def generate_on_graph(gen: Generator, prompt: str, cfg: GenerationConfig) -> list[int]:
    """``gen``'s greedy tokens for ``prompt``; with ``cfg.medusa``, on the heads' graph at every step. Left to
    `Speculation.heads_for`, every other request (and all of them where the heads do not pay) runs the vanilla graph,
    and a check of "Medusa" would compare the vanilla graph with itself."""
    return gen.generate(prompt, cfg, heads=True if cfg.medusa else None).token_ids


def teacher_forced(gen: Generator, ids: list[int]):
    """One causal forward of ``ids`` (no Medusa): the base model's outputs at every position. InputError when
    ``ids`` exceed the backend's max_seq (the backend would fail deep inside its graph)."""
    n = len(ids)
    if n > gen.backend.max_seq:
        raise InputError(f"a teacher-forced forward of {n} tokens exceeds the maximum sequence of "
                         f"{gen.backend.max_seq}: ask for fewer new tokens (--max-new-tokens)")
    with gen.backend.new_session(n + 1) as session:
        return session.run(np.asarray(ids, np.int64), np.arange(n), np.tri(n, dtype=bool), False, 1.0)


def _first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
