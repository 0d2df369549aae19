"""Calibrate a Medusa tree to given heads on given hardware: measure, then search.

    result = calibrate(backend, tokenizer, "prompts.jsonl", max_new_tokens=128, node_budget=63)
    Path("tree.json").write_text(json.dumps(result))   # {"medusa_choices": [...], "calibration": {...}}

1. Head accuracy: vanilla greedy decoding (one token per step, ``medusa=True`` so every step also
   returns the heads' top-R). With the hidden state at position t the base model predicts t+1 and
   head d predicts t+2+d, so head d's rank-r guess is scored against the greedy token at t+2+d.
2. Latency: the median time of one ``session.run`` over T tokens after a ~200-token prefix.
3. `tree_search.search_tree`: the tree with the most predicted tokens per second.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .backends.base import Backend
from .generation_config import is_int
from .errors import InputError
from .generator import checked_token_ids
from .prompts import jsonl_rows, read_prompts
from .tokenizer import ChatTokenizer
from .tree import MAX_TREE_NODES
from .tree_search import search_tree

DEFAULT_SIZES: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
Progress = Callable[[str], None]


@dataclass(frozen=True)
class HeadAccuracy:
    """Hit rates of head d's rank-r guess, ``[K, R]``.

    ``marginal``: over every position where the truth for head d is known.
    ``conditional``: over the positions where every earlier head had the truth somewhere in its
    top-R, i.e. where a tree path could have reached depth d; this is what the tree model's
    product of per-depth probabilities wants. Depths with no such position fall back to marginal.
    """

    conditional: np.ndarray  # [K, R] float64
    marginal: np.ndarray  # [K, R] float64
    positions: np.ndarray  # [K] positions scored for the marginal rate
    conditional_positions: np.ndarray  # [K] positions scored for the conditional rate

    def table(self, mode: str = "conditional") -> np.ndarray:
        if mode not in ("conditional", "marginal"):
            raise InputError(f"accuracy mode {mode!r} is unknown: use 'conditional' or 'marginal'")
        return self.conditional if mode == "conditional" else self.marginal

    def to_json(self) -> dict:
        return {"conditional": self.conditional.tolist(), "marginal": self.marginal.tolist(),
                "positions": self.positions.tolist(), "conditional_positions": self.conditional_positions.tolist()}


def measure_head_accuracy(stream: Iterable[tuple[np.ndarray, Sequence[int]]]) -> HeadAccuracy:
    """Accuracy from pairs ``(medusa_ids [K, R], future)``: ``future[d]`` is the true token for head d
    (the greedy token at t+2+d); ``future`` may be shorter than K near the end of a sequence."""
    hits = cond_hits = None
    for ids, future in stream:
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise InputError(f"medusa ids must be [heads, ranks], got shape {ids.shape}")
        if hits is None:
            k, r = ids.shape
            hits, cond_hits = np.zeros((k, r)), np.zeros((k, r))
            n, cond_n = np.zeros(k, np.int64), np.zeros(k, np.int64)
        elif ids.shape != hits.shape:
            raise InputError(f"medusa ids changed shape from {hits.shape} to {ids.shape}")
        reachable = True
        for d, tok in enumerate(list(future)[: ids.shape[0]]):
            hit = ids[d] == int(tok)
            hits[d] += hit
            n[d] += 1
            if reachable:
                cond_hits[d] += hit
                cond_n[d] += 1
                reachable = bool(hit.any())
    if hits is None or n[0] == 0:
        raise InputError("no calibration positions: no answer ran past its first new token (each ended at once, "
                         "at an end of sequence or the max_seq): give other prompts, leaving room for at least 2 new "
                         "tokens")
    marginal = hits / np.maximum(n, 1)[:, None]
    conditional = np.where(cond_n[:, None] > 0, cond_hits / np.maximum(cond_n, 1)[:, None], marginal)
    return HeadAccuracy(conditional, marginal, n, cond_n)


def head_predictions(backend: Backend, prompts: Iterable[Sequence[int]], max_new_tokens: int,
                     eos_ids: Sequence[int] = ()) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Vanilla greedy decoding of every prompt; yields ``(medusa_ids [K, R], future [<= K])`` per
    generated position (the last prompt position included)."""
    if not backend.has_medusa:
        raise InputError("calibration needs Medusa heads: load the backend with heads")
    k = backend.dims.num_heads
    eos = {int(e) for e in eos_ids}
    for i, prompt in enumerate(prompts):
        ids = [int(t) for t in prompt]
        with backend.new_session() as session:
            if not ids or len(ids) + 1 >= session.capacity:
                raise InputError(f"calibration prompt {i + 1} has {len(ids)} tokens: need 1..{session.capacity - 2} "
                                 f"to fit the backend's max_seq {session.capacity}")
            tokens, heads = _greedy_with_heads(session, ids, max_new_tokens, eos)
        # heads[j] sits where tokens[j] is predicted, so head d's truth is tokens[j + 1 + d].
        for j in range(len(tokens) - 1):
            yield heads[j], np.asarray(tokens[j + 1 : j + 1 + k], np.int64)


def _greedy_with_heads(session, ids: list[int], max_new_tokens: int, eos: set[int]) -> tuple[list[int], list]:
    """Up to ``max_new_tokens`` greedy tokens after ``ids`` (ending at an end of sequence or the session's capacity)
    and the heads' top-R ids at the position that predicted each."""
    n = len(ids)
    out = session.run(np.asarray(ids, np.int64), np.arange(n), np.tri(n, dtype=bool), True, 1.0)
    session.keep(np.arange(n))
    tokens, heads = [int(out.next_ids[-1, 0])], [np.array(out.medusa_ids[-1])]  # copies: buffers are reused
    one = np.ones((1, 1), bool)
    while len(tokens) < max_new_tokens and tokens[-1] not in eos and session.length + 1 <= session.capacity:
        out = session.run(np.array([tokens[-1]]), np.array([session.length]), one, True, 1.0)
        session.keep(np.arange(1))
        tokens.append(int(out.next_ids[0, 0]))
        heads.append(np.array(out.medusa_ids[0]))
    return tokens, heads


def measure_latency(backend: Backend, sizes: Sequence[int] = DEFAULT_SIZES, past: int = 200,
                    repeats: int = 10, warmup: int = 2, seed: int = 0) -> dict[int, float]:
    """Median seconds of one Medusa-graph ``session.run`` of T tokens after a ``past``-token prefix, per T
    in ``sizes`` (see `measure_steps`)."""
    sizes = sorted({int(s) for s in sizes})
    table = measure_steps(backend, [(t, backend.has_medusa) for t in sizes], past, repeats, warmup, seed)
    return {t: table[(t, backend.has_medusa)] for t in sizes}


def measure_steps(backend: Backend, cases: Sequence[tuple[int, bool]], past: int = 200, repeats: int = 10,
                  warmup: int = 2, seed: int = 0) -> dict[tuple[int, bool], float]:
    """Median seconds of one ``session.run`` per case ``(T, medusa graph?)`` after a ``past``-token prefix.

    ``past`` shrinks to fit the backend's ``max_seq``. The cases of one graph are interleaved in every
    round so slow drift (clocks, thermals) hits them all alike. Runs are never kept: each overwrites the
    staged rows.
    """
    cases = sorted({(int(t), bool(m)) for t, m in cases})
    if not cases or cases[0][0] < 1 or repeats < 1:
        raise InputError(f"latency needs sizes >= 1 and repeats >= 1, got {cases}, repeats={repeats}")
    largest = max(t for t, _ in cases)
    with backend.new_session() as session:
        return _timed_steps(session, backend.dims.vocab_size, cases, min(past, session.capacity - largest), repeats,
                            warmup, seed)


def _timed_steps(session, vocab: int, cases: list[tuple[int, bool]], past: int, repeats: int, warmup: int,
                 seed: int) -> dict[tuple[int, bool], float]:
    """`measure_steps` on one open ``session``: ``past`` random tokens kept, then every case timed."""
    largest = max(t for t, _ in cases)
    if past < 1:
        raise InputError(f"step size {largest} does not fit the backend's max_seq {session.capacity}: "
                         "measure smaller sizes or build with a larger max_seq")
    rng = np.random.default_rng(seed)
    session.run(rng.integers(0, vocab, past), np.arange(past), np.tri(past, dtype=bool), False, 1.0)
    session.keep(np.arange(past))
    inputs = {t: (rng.integers(0, vocab, t), past + np.arange(t), np.tri(t, dtype=bool)) for t, _ in cases}
    times: dict[tuple[int, bool], list[float]] = {c: [] for c in cases}
    # One graph at a time: right after a switch, the other graph's idle worker threads (ONNX Runtime
    # spins them) compete for the cores and inflate the next runs several-fold.
    for graph in sorted({m for _, m in cases}):
        group = [c for c in cases if c[1] == graph]
        for round_ in range(warmup + repeats):
            for t, medusa in group:
                ids, pos, mask = inputs[t]
                t0 = time.perf_counter()
                session.run(ids, pos, mask, medusa, 1.0)
                if round_ >= warmup:
                    times[(t, medusa)].append(time.perf_counter() - t0)
    return {c: float(np.median(v)) for c, v in times.items()}


def check_node_budget(node_budget: int, max_seq: int) -> None:
    """The latency table times a step of ``node_budget + 1`` tokens after at least one token of past: a budget
    beyond that would be refused only after every prompt was decoded. Nor more than `MAX_TREE_NODES`: a chosen tree
    past it could not be built, or loaded from the written file (found only after the measurements)."""
    if node_budget > MAX_TREE_NODES:
        raise InputError(f"--node-budget {node_budget} is past the largest tree the runtime takes ({MAX_TREE_NODES} "
                         f"nodes): use --node-budget {MAX_TREE_NODES} or less")
    if node_budget + 2 > max_seq:
        raise InputError(f"--node-budget {node_budget} does not fit the artifact's max_seq {max_seq} (a step of "
                         f"{node_budget + 1} tokens after one of past): use --node-budget {max_seq - 2} or less, or "
                         f"rebuild the artifact with a larger --max-seq")


def check_prompt_lengths(ids: Sequence[Sequence[int]], max_seq: int, name: Callable[[int], str]) -> None:
    """Every prompt must leave room for its first new token and one more step (`head_predictions`); checked
    before the decoding so that a long prompt is not found after the others took minutes. ``name(i)`` says where
    prompt ``i`` (0-based) came from."""
    most = max_seq - 2
    for i, p in enumerate(ids):
        if len(p) > most:
            raise InputError(f"{name(i)}: the calibration prompt has {len(p)} tokens but at most {most} fit the "
                             f"artifact's max_seq {max_seq}: shorten it or leave it out")


def prompt_names(path: str | Path | None) -> Callable[[int], str]:
    """Where prompt ``i`` of a prompts file (read in file order, one per non-blank line) sits: "FILE line N"
    (1-based); without a file, "calibration prompt N". The file is read only when a name is asked for (an error),
    and only up to that prompt's line: `--limit 1` reads one line, whatever (broken, huge) follows it."""
    if path is None:
        return lambda i: f"calibration prompt {i + 1}"

    def name(i: int) -> str:
        lines = [lineno for lineno, _ in itertools.islice(jsonl_rows(Path(path)), i + 1)]
        return f"{path} line {lines[i]}" if i < len(lines) else f"{path} prompt {i + 1}"

    return name


def _prompt_ids(tokenizer: ChatTokenizer | None, prompts: str | Path | Sequence[str | Sequence[int]], chat: bool,
                name: Callable[[int], str], vocab: int) -> list[list[int]]:
    if not isinstance(prompts, (str, Path, list, tuple)):
        raise InputError(f"prompts must be a JSONL path or a list of prompts, got {type(prompts).__name__}")
    items = read_prompts(prompts) if isinstance(prompts, (str, Path)) else list(prompts)
    out = []
    for i, p in enumerate(items):
        if isinstance(p, str):
            if tokenizer is None:
                raise InputError("text prompts need a tokenizer: pass one, or give prompts as token-id lists")
            out.append(tokenizer.encode_prompt(p, chat=chat))
        else:  # in the vocabulary: -1 wrapped around to the last token in the graph, and 1.7 was read as 1
            out.append(checked_token_ids(p, vocab, name(i)))
        if not out[-1]:
            raise InputError(f"{name(i)} is empty after tokenization")
    if not out:
        raise InputError("no calibration prompts given")
    return out


def _whole(what: str, value, minimum: int, why: str = "") -> None:
    """InputError unless ``value`` is an integer (not a bool) of at least ``minimum``."""
    if not (is_int(value) and value >= minimum):
        raise InputError(f"{what} must be an integer >= {minimum}{why}, got {value!r:.40}")


def calibrate(backend: Backend, tokenizer: ChatTokenizer | None, prompts: str | Path | Sequence[str | Sequence[int]],
              max_new_tokens: int = 128, node_budget: int = 63, *, sizes: Sequence[int] = DEFAULT_SIZES,
              past: int = 200, repeats: int = 10, warmup: int = 2, accuracy: str = "conditional", chat: bool = True,
              progress: Progress | None = None) -> dict:
    """Measure head accuracy and step latency on ``backend`` and choose the tree with the most
    predicted tokens per second. Returns ``{"medusa_choices": [...], "calibration": {...}}``, ready
    for ``json.dump`` to a tree.json that `tree.load_choices` reads.

    ``prompts``: a JSONL path, or a list of strings (need ``tokenizer``) or token-id lists.
    ``node_budget``: most paths in the tree (the root not counted); the latency sizes are extended to
    ``node_budget + 1`` when they stop short, so the search never extrapolates.
    """
    say = progress or (lambda _msg: None)
    _whole("max_new_tokens", max_new_tokens, 2, " to score any head")
    _whole("node budget", node_budget, 1)
    _whole("past", past, 1)
    _whole("repeats", repeats, 1)
    _whole("warmup", warmup, 0)
    if not isinstance(sizes, (list, tuple, range)) or not sizes:
        raise InputError(f"sizes must be a non-empty list of step sizes in tokens, got {sizes!r:.60}")
    for size in sizes:
        _whole("a step size", size, 1)
    mode = accuracy  # checked here, before the slow steps
    if mode not in ("conditional", "marginal"):
        raise InputError(f"accuracy mode {mode!r} is unknown: use 'conditional' or 'marginal'")
    check_node_budget(node_budget, backend.max_seq)
    name = prompt_names(prompts if isinstance(prompts, (str, Path)) else None)
    ids = _prompt_ids(tokenizer, prompts, chat, name, backend.dims.vocab_size)
    check_prompt_lengths(ids, backend.max_seq, name)
    eos = tuple(getattr(tokenizer, "eos_token_ids", ()) or ())
    say(f"decoding {len(ids)} prompts (up to {max_new_tokens} tokens each) to score the heads")
    t0 = time.perf_counter()
    acc = measure_head_accuracy(head_predictions(backend, ids, max_new_tokens, eos))
    decode_s = time.perf_counter() - t0
    sizes = sorted({int(s) for s in sizes if int(s) <= node_budget + 1} | {1, node_budget + 1})
    say(f"timing steps of {sizes} tokens ({repeats} repeats)")
    # The vanilla graph (no heads) at T=1 is what Medusa must beat; timed in the same rounds.
    steps = measure_steps(backend, [(t, True) for t in sizes] + [(1, False)], past, repeats, warmup)
    table = {t: steps[(t, True)] for t in sizes}
    vanilla_tokens_per_s = 1.0 / steps[(1, False)]
    # A fused graph verifies at most the paths of the tree it was built for, each with its own attention pass,
    # and its measured step times include them: search only trees it can run at those times.
    result = search_tree(acc.table(mode), table, node_budget=node_budget, max_paths=backend.max_paths)
    say(f"chose {result.candidates} candidates: {result.expected_accepted:.2f} expected accepted, "
        f"{result.tokens_per_s:.1f} tokens/s predicted ({vanilla_tokens_per_s:.1f} vanilla)")
    search = result.to_json()
    choices = search.pop("medusa_choices")
    calibration = {
        "backend": backend.name,
        "num_heads": backend.dims.num_heads,
        "head_topk": backend.dims.head_topk,
        "prompts": len(ids),
        "max_new_tokens": max_new_tokens,
        "node_budget": node_budget,
        "max_paths": backend.max_paths,
        "accuracy_mode": mode,
        "head_accuracy": acc.to_json(),
        "decode_s": decode_s,
        "latency": {"nodes": list(table), "median_s": list(table.values()),
                    "past": min(past, backend.max_seq - sizes[-1]), "repeats": repeats,
                    "vanilla_median_s": steps[(1, False)]},
        **search,
        "vanilla_tokens_per_s": vanilla_tokens_per_s,
        "predicted_speedup": search["tokens_per_s"] / vanilla_tokens_per_s,
    }
    return {"medusa_choices": choices, "calibration": calibration}
