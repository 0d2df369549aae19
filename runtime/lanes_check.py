"""Is a batched (lanes) step bit-identical to one-sequence steps on this machine? Checked at build time and by
`verify`, since the guarantee rests on ONNX Runtime computing every row independently of the others.

    report = lanes_exactness(backend, [[5, 6, 7], [1, 2, 3, 4, 5, 6]], steps=3)
    report["exact"]          # True: every row's top ids and probabilities equal, bit for bit
"""

from __future__ import annotations

import numpy as np

from .backends.lanes import Lane
from .errors import InputError

Outputs = list[tuple[np.ndarray, np.ndarray]]  # per run: (next_ids, next_probs)


def lanes_exactness(backend, prompts: list[list[int]], steps: int = 3) -> dict:
    """Prefill every prompt and decode ``steps`` greedy tokens, alone (the vanilla graph, one sequence at a time)
    and together (the lanes graph: the prompts in one step, then one row each per step); compare every row's top
    ids and probabilities. Each prompt is cut to leave its ``steps`` within the backend's max_seq (a 40-token prompt
    overflowed a --max-seq 32 build), and at most as many prompts as the graph has lanes are taken. InputError
    when no prompt (or an empty one) is left: a check of nothing would read "exact"."""
    lanes = backend.lanes
    prompts = [list(p)[:backend.max_seq - steps] for p in prompts][:lanes.lanes]
    if not prompts or not all(prompts):
        raise InputError(f"the lanes check needs at least one prompt of 1..{backend.max_seq - steps} tokens, got "
                         f"lengths {[len(p) for p in prompts]}: give non-empty prompts")
    alone = [_alone(backend, p, steps) for p in prompts]
    together = _together(lanes, [backend.new_session() for _ in prompts], prompts, steps)
    exact, worst = True, 0.0
    for a, b in zip(alone, together):
        for (ids_a, probs_a), (ids_b, probs_b) in zip(a, b):
            exact &= bool(np.array_equal(ids_a, ids_b) and np.array_equal(probs_a, probs_b))
            worst = _largest(worst, probs_a, probs_b)
    return {"sequences": len(prompts), "steps": steps, "exact": exact, "max_abs_difference": worst}


def _largest(worst: float, a: np.ndarray, b: np.ndarray) -> float:
    """``worst`` or the largest difference of ``a`` and ``b``, whichever is larger; NaN once any is NaN (Python's
    ``max`` kept 0.0 beside a NaN, so a row of NaN read as no difference at all); inf when the shapes differ."""
    if a.shape != b.shape:
        return float("inf")
    diff = float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0
    return float(np.max([worst, diff]))


def _together(lanes, sessions: list, prompts: list[list[int]], steps: int) -> list[Outputs]:
    """Every prompt's outputs of one lanes step per run: the prompts together, then one greedy token each."""
    together: list[Outputs] = [[] for _ in prompts]
    feed = [np.asarray(p, np.int64) for p in prompts]
    try:
        for _ in range(steps + 1):
            outs = lanes.run([Lane(s, tokens, 1.0) for s, tokens in zip(sessions, feed)])  # lanes 0..n-1
            for i, out in enumerate(outs):
                lanes.keep(sessions[i], np.arange(len(feed[i])))
                together[i].append((out.next_ids, out.next_probs))
            feed = [np.array([out.next_ids[-1, 0]], np.int64) for out in outs]
    finally:
        for s in sessions:
            s.close()
    return together


def _alone(backend, prompt: list[int], steps: int) -> Outputs:
    outputs = []
    with backend.new_session() as s:
        tokens = np.asarray(prompt, np.int64)
        for _ in range(steps + 1):
            n = len(tokens)
            out = s.run(tokens, s.length + np.arange(n), np.tri(n, dtype=bool), False, 1.0)
            s.keep(np.arange(n))
            outputs.append((out.next_ids, out.next_probs))
            tokens = np.array([out.next_ids[-1, 0]], np.int64)
    return outputs
