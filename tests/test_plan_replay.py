"""scripts/plan_replay.py: the runtime's decode loop replayed on a known greedy answer makes exactly that answer,
and each way of choosing the draft is scored on the steps it would have taken."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import load_script

from medusa_export.exporter.corpus_table import count_table
from medusa_export.runtime import decode

VOCAB = 16
PROMPT = [1, 2, 3, 4, 5, 6, 7]
# The answer repeats the prompt's phrase (context drafts find it) and then a phrase the corpus holds
ANSWER = [8, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 9, 10, 11, 12, 13, 14, 15, 0]
COSTS = [0.010 + 0.0005 * r for r in range(9)]  # s by rows: a row costs 5 % of a one-row step


@pytest.fixture(scope="module")
def replay():
    return load_script("plan_replay")


@pytest.fixture
def corpus():
    return count_table([np.array([9, 10, 11, 12, 13, 14, 15] * 3)], vocab_size=VOCAB, min_count=1)


def _decoded(replay, corpus, variant: str) -> tuple[list[int], list[int]]:
    spec = replay.ReplaySpeculation(COSTS, corpus, variant)
    spec.truth = PROMPT + ANSWER
    session = replay.ReplaySession(spec.truth)
    made: list[int] = []
    for new in decode.decode(session, PROMPT, None, decode.GenerationConfig(), decode.DecodeStats(), spec):
        made += new
        if len(made) >= len(ANSWER):
            break
    return made[:len(ANSWER)], session.rows


@pytest.mark.parametrize("variant", ["runtime", "context", "corpus", "oracle", "per-token", "agree",
                                     "context-ngram-5", "pair"])
def test_every_variant_replays_exactly_the_answer(replay, corpus, variant):
    made, rows = _decoded(replay, corpus, variant)
    assert made == ANSWER
    assert len(rows) - 1 < len(ANSWER) - 1  # drafts were accepted: fewer steps than tokens after the prefill


def test_a_row_off_the_answer_matches_no_token(replay):
    session = replay.ReplaySession(PROMPT + ANSWER)
    session.keep(np.arange(len(PROMPT)))
    tokens = np.array([8, 1, 9])  # the root, a right draft, a wrong one
    out = session.run(tokens, None, np.tri(3, dtype=bool), False, 1.0)
    assert out.next_ids[:, 0].tolist() == [1, 2, -1]  # the wrong row's path leaves the answer: it matches nothing


def test_the_report_counts_steps_and_scores_them_by_the_cost_table(replay, corpus):
    row = replay.replay([{"prompt_ids": PROMPT, "ids": ANSWER}], replay.ReplaySpeculation(COSTS, corpus, "runtime"),
                        COSTS)
    assert row["tokens"] == len(ANSWER) - 1
    assert row["tokens_per_step"] == round(row["tokens"] / row["steps"], 3) > 1
    assert 1 < row["speedup"] < row["tokens_per_step"]  # rows cost something
