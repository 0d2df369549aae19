"""Would corpus drafts that match longer suffixes (5-8 tokens) draft better than the table's 4? Replays the runtime's
chooser (`plan_replay.py`) on the model's greedy answers with a table that also knows the longer n-grams.

    python scripts/corpus_ngram_replay.py artifacts/smollm2 --answers answers_100.json answers_300.json \\
        --max-ngram 4 5 6 --json corpus_ngram_replay.json

The longer n-grams are counted from the same texts the build counts (ShareGPT's assistant turns once each, the
shipped heads' answers `own_answers.WEIGHT` times, at least `MIN_COUNT`), keyed by a 64-bit hash and kept only for
n-grams the answers hold: the replay never looks up others before a draft token has gone wrong. Shorter suffixes
come from the artifact's own table. Step costs are those of `docs/speculation.md` (26.6-38.2 ms for 1-9 rows).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from medusa_export.runtime import corpus_drafts, speculation  # noqa: E402
from script_io import run_main, with_machine, writable, write_json  # noqa: E402

COSTS_MS = (26.6, 28.0, 28.8, 29.8, 30.8, 31.0, 35.3, 37.8, 38.2)
HEADS = Path(__file__).resolve().parents[1] / "exporter" / "shipped_heads" / "smollm2-135m-instruct" / "answers.npz"
_MULT = np.random.default_rng(1).integers(1, 2**63, size=8, dtype=np.uint64) | np.uint64(1)


def _hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit key for every n-gram of ``ids`` that has a token after it."""
    ids, m = ids.astype(np.uint64), len(ids) - n
    h = np.zeros(max(m, 0), np.uint64)
    for j in range(n):
        h = h * _MULT[j] + ids[j:j + m] + np.uint64(0x9E3779B97F4A7C15)
    return h


def long_tables(artifact: Path, sequences: list[np.ndarray], max_ngram: int, vocab: int) -> dict[int, dict]:
    """{n: {key: (next token, n, share)}} for n of 5..max_ngram, the n-grams of ``sequences`` only."""
    from medusa_export.exporter.corpus_table import MIN_COUNT, encode_texts, sharegpt_answers
    from medusa_export.exporter.own_answers import WEIGHT, load_answers
    from medusa_export.runtime.tokenizer import ChatTokenizer

    streams = encode_texts(ChatTokenizer.from_directory(artifact), sharegpt_answers()[0])
    own = load_answers(HEADS, vocab)
    lengths = [len(s) for s in streams + own]
    ids = np.concatenate(streams + own)
    text = np.repeat(np.arange(len(lengths)), lengths)
    weight = np.repeat(np.array([1] * len(streams) + [WEIGHT] * len(own), np.int64), lengths)
    tables = {}
    for n in range(5, max_ngram + 1):
        wanted = np.unique(np.concatenate([_hashes(np.r_[s, 0], n) for s in sequences]))
        h = _hashes(ids, n)
        m = len(h)
        ok = (text[:m] == text[n:n + m]) & np.isin(h, wanted)
        counts: dict = {}
        for key, nxt, w in zip(h[ok].tolist(), ids[n:n + m][ok].tolist(), weight[:m][ok].tolist()):
            per = counts.setdefault(key, {})
            per[nxt] = per.get(nxt, 0) + w
        tables[n] = {}
        for key, per in counts.items():
            nxt, count = min(per.items(), key=lambda kv: (-kv[1], kv[0]))
            if count >= MIN_COUNT:
                tables[n][key] = (nxt, n, count / sum(per.values()))
    return tables


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--answers", type=Path, nargs="+", required=True, help="plan_replay.py --answers files")
    ap.add_argument("--max-ngram", type=int, nargs="+", default=[4, 5, 6])
    ap.add_argument("--json", type=writable)
    args = ap.parse_args()
    base = corpus_drafts.CorpusTable.load(args.artifact / corpus_drafts.FILE, 49152)
    answers = {p.name: json.loads(p.read_text()) for p in args.answers}
    sequences = [np.asarray(a["prompt_ids"] + a["ids"], np.int64) for rows in answers.values() for a in rows]
    tables = long_tables(args.artifact, sequences, max(args.max_ngram), 49152)
    costs = [c / 1e3 for c in COSTS_MS]
    report = {"artifact": str(args.artifact), "costs_ms": COSTS_MS, "rows": []}
    for top in args.max_ngram:
        # More n-gram lengths mean more acceptance classes: the modules' constants, as a build with them would have.
        corpus_drafts.MAX_NGRAM = top
        corpus_drafts.NUM_KINDS = speculation.NUM_KINDS = corpus_drafts.rate_kind(top, 1.0) + 1
        speculation.PRIOR_CORPUS_FIRST = {n: (0.13, 0.27, 0.4) for n in range(1, top + 1)}
        import plan_replay

        class LongTable(corpus_drafts.CorpusTable):
            def __init__(self) -> None:
                super().__init__(base.keys, base.nexts, base.shares, base.bits)
                self.max_ngram = top

            def _search(self, suffix):
                for n in range(len(suffix), 4, -1):
                    hit = tables[n].get(int(_hashes(np.asarray([*suffix[-n:], 0], np.int64), n)[0]))
                    if hit:
                        return hit
                return base._search(tuple(suffix[-4:]))

        for name, rows in answers.items():
            for variant in ("runtime", "corpus", "oracle"):
                row = plan_replay.replay(rows, plan_replay.ReplaySpeculation(costs, LongTable(), variant), costs)
                report["rows"].append({"max_ngram": top, "answers": name, "variant": variant, **row})
                print(top, name, variant, row, flush=True)
    if args.json:
        write_json(args.json, with_machine(report), indent=2)


if __name__ == "__main__":
    run_main(main)
