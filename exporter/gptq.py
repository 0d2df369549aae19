"""int8 weights rounded against the inputs they will meet (GPTQ: Frantar et al. 2022, arXiv 2210.17323).

    hessians = input_hessians(model, calibration_ids)       # {graph MatMul name: X^T X of its input}, float64
    w8 = round_columns(w, hessians["L3/down"], scale)       # int8 [K, N], one scale per output column

Rounding each weight to the nearest step leaves every error where it falls. GPTQ rounds the input rows of ``W``
[K, N] one at a time and moves what each rounding lost onto the rows not yet rounded, weighted by how the
calibration inputs correlate (``H = X^T X``): the product ``x @ W8 * scale`` stays closer to ``x @ W`` on inputs
like them. The format does not change (int8 per output column, `quantize_rows`), nor the cost of a step.

Measured on the default model (docs/quantization.md, "Where int8 rows loses agreement"): with fp32 activations (PyTorch),
per-column int8 weights agree 97.4 % (to nearest) and 98.4 % (GPTQ) in teacher-forced top-1 with fp32 on held-out
prompts; in the int8 rows graph, whose activations are int8 per row, GPTQ moved it within noise (97.2 -> 97.2 %,
97.1 -> 97.1 % on two prompt sets) and the perplexity change up (+0.13 -> +0.56 %), so the recipe rounds to nearest
and GPTQ is an option of `scripts/int8_variants.py` (``--gptq``).

Why here and not in PyTorch: the graph turns some matmul inputs (`rotation`), and the weights it quantizes are the
turned ones; `quantize_rows` turns ``H`` the same way (`turned_hessian`) before rounding.
"""

from __future__ import annotations

import hashlib

import numpy as np

DAMP = 0.01  # added to H's diagonal, times its mean: keeps the inverse defined where inputs are few or collinear
BLOCK = 128  # input rows rounded between two updates of the rows after them (the result does not depend on it)


def input_hessians(model, calibration_ids: list[list[int]]) -> dict[str, np.ndarray]:
    """``X^T X`` (float64) of the inputs of every decoder matmul and of the lm_head over the calibration sequences,
    keyed by the name the exported graph gives the MatMul (`fused_backbone`: ``L{i}/qkv``, ``L{i}/o``,
    ``L{i}/gate_up``, ``L{i}/down``; ``tail//lm_head/MatMul``). q/k/v and gate/up share their input."""
    import torch

    if not calibration_ids:
        raise ValueError("GPTQ needs calibration sequences")
    modules = {"tail//lm_head/MatMul": model.lm_head}
    for i, layer in enumerate(model.model.layers):
        modules.update({f"L{i}/qkv": layer.self_attn.q_proj, f"L{i}/o": layer.self_attn.o_proj,
                        f"L{i}/gate_up": layer.mlp.gate_proj, f"L{i}/down": layer.mlp.down_proj})
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def add(_module, inputs, _output) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
        return add

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        with torch.no_grad():
            for ids in calibration_ids:
                model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return {name: s.numpy() for name, s in sums.items()}


def turned_hessian(hessian: np.ndarray, block_matrix: np.ndarray) -> np.ndarray:
    """``H`` of the input turned per block by ``block_matrix`` [B, B] (``x -> x @ R``): ``R^T H R`` block by block."""
    b = block_matrix.shape[0]
    k = hessian.shape[0]
    r = np.kron(np.eye(k // b), block_matrix.astype(np.float64))
    return r.T @ hessian @ r


def round_columns(w: np.ndarray, hessian: np.ndarray, scale: np.ndarray, damp: float = DAMP,
                  block: int = BLOCK) -> np.ndarray:
    """int8 ``[K, N]`` with ``W8 * scale`` close to ``W`` [K, N] where it counts on inputs of ``X^T X`` =
    ``hessian`` [K, K]: the rows in order of decreasing input energy, each rounded to nearest (clipped to +-127) and
    its error spread over the rows still to round (GPTQ). Deterministic for the same arguments."""
    k = w.shape[0]
    if hessian.shape != (k, k) or scale.shape != (w.shape[1],):
        raise ValueError(f"GPTQ: weight {w.shape}, hessian {hessian.shape} and scale {scale.shape} do not match")
    h = np.array(hessian, dtype=np.float64)
    diag = np.diag(h).copy()
    dead = diag <= 0  # inputs the calibration never set: rounded to nearest, their error moved nowhere
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    order = np.argsort(-diag, kind="stable")
    h = h[order][:, order]
    h[np.diag_indices(k)] += damp * max(float(np.mean(np.diag(h))), 1e-12)
    upper = np.linalg.cholesky(np.linalg.inv(h)).T  # H^-1 = U^T U
    work = np.array(w, dtype=np.float64)[order]
    q = np.empty((k, w.shape[1]), np.int8)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        rows, errors, u = work[b0:b1], np.zeros((b1 - b0, w.shape[1])), upper[b0:b1, b0:b1]
        for i in range(b1 - b0):
            qi = np.clip(np.rint(rows[i] / scale), -127, 127)
            q[b0 + i] = qi
            errors[i] = (rows[i] - qi * scale) / u[i, i]
            rows[i + 1:] -= np.outer(u[i, i + 1:], errors[i])
        work[b1:] -= upper[b0:b1, b1:].T @ errors
    out = np.empty_like(q)
    out[order] = q
    return out


class Rounding:
    """``round_columns`` for the MatMuls that have a Hessian, by graph node name, remembered per (weight, Hessian,
    scale): the vanilla, Medusa and batched graphs carry the same weights, and must get the same int8 weights (a
    token's result may not depend on which graph computed it)."""

    def __init__(self, hessians: dict[str, np.ndarray]) -> None:
        self.hessians = hessians
        self._done: dict[str, np.ndarray] = {}

    def hessian(self, node_name: str) -> np.ndarray | None:
        return self.hessians.get(node_name)

    def __call__(self, w: np.ndarray, hessian: np.ndarray, scale: np.ndarray) -> np.ndarray:
        key = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in (w, hessian, scale))).hexdigest()
        if key not in self._done:
            self._done[key] = round_columns(w, hessian, scale)
        return self._done[key]
