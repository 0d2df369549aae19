"""Is a batched (lanes) step bit-identical to one-sequence steps on this machine? Checked at build time and by
`verify`, since the guarantee rests on ONNX Runtime computing every row independently of the others.

    report = lanes_exactness(backend, [[5, 6, 7], [1, 2, 3, 4, 5, 6]], steps=3)
    report["exact"]          # True: every row's top ids and probabilities equal, bit for bit
"""

from __future__ import annotations

import numpy as np

from .backends.lanes import Lane


def lanes_exactness(backend, prompts: list[list[int]], steps: int = 3) -> dict:
    """Prefill every prompt and decode ``steps`` greedy tokens, alone (the vanilla graph, one sequence at a time)
    and together (the lanes graph: the prompts in one step, then one row each per step); compare every row. Each
    prompt is cut to leave its ``steps`` within the backend's max_seq (a 40-token prompt overflowed a --max-seq 32
    build), and at most as many prompts as the graph has lanes are taken."""
    lanes = backend.lanes
    prompts = [list(p)[:backend.max_seq - steps] for p in prompts][:lanes.lanes]
    alone = [_alone(backend, p, steps) for p in prompts]
    sessions = [backend.new_session() for _ in prompts]
    together: list[list[np.ndarray]] = [[] for _ in prompts]
    feed = [np.asarray(p, np.int64) for p in prompts]
    for _ in range(steps + 1):
        outs = lanes.run([Lane(s, tokens, 1.0) for s, tokens in zip(sessions, feed)])  # lanes 0..n-1
        for i, out in enumerate(outs):
            lanes.keep(sessions[i], np.arange(len(feed[i])))
            together[i].append(out.next_probs)
        feed = [np.array([out.next_ids[-1, 0]], np.int64) for out in outs]
    worst, exact = 0.0, True
    for a, b in zip(alone, together):
        for x, y in zip(a, b):
            exact &= bool(np.array_equal(x, y))
            worst = max(worst, float(np.abs(x.astype(np.float64) - y).max()))
    for s in sessions:
        s.close()
    return {"sequences": len(prompts), "steps": steps, "exact": exact, "max_abs_difference": worst}


def _alone(backend, prompt: list[int], steps: int) -> list[np.ndarray]:
    probs = []
    with backend.new_session() as s:
        tokens = np.asarray(prompt, np.int64)
        for _ in range(steps + 1):
            n = len(tokens)
            out = s.run(tokens, s.length + np.arange(n), np.tri(n, dtype=bool), False, 1.0)
            s.keep(np.arange(n))
            probs.append(out.next_probs)
            tokens = np.array([out.next_ids[-1, 0]], np.int64)
    return probs
