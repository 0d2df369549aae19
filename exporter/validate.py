"""Check an exported graph against PyTorch right after export, on random inputs at several shapes.

    report = validate_graph(step, "out/medusa.onnx", dtype="float32")   # raises ExportValidationError

Float outputs: max absolute error per output against a tolerance per dtype. Id outputs (top-k indices)
can legitimately differ where two logits are within rounding of each other, so their top-1 is compared, as
the fraction of positions (and heads) where it differs. A differing top-1 whose PyTorch score is within a few of the
dtype's roundings of PyTorch's own top-1 (TIE_TOLERANCE) is a tie (`id_ties` in the report; capped at MAX_ID_TIES),
not an error.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from medusa_export.runtime import io_table, kernels
from medusa_export.runtime.errors import ExportValidationError, ModelError
from medusa_export.runtime.tree_paths import PathBatch

from .onnx_export import dummy_inputs
from .step_model import StepModel

# (T, past, tree): prefill-like, single token, a tree step (a random tree mask, positions past + depth)
SHAPES = ((7, 0, False), (1, 9, False), (12, 20, True))
TOLERANCE = {"float32": 1e-3, "float16": 5e-2}
MAX_ID_MISMATCH = 0.02
# Ties a graph may break the other way, as a fraction of all positions: an fp16 graph swaps near-tied ids; one that
# "ties" nearly everywhere disagrees with PyTorch, whatever its scores say.
MAX_ID_TIES = 0.25
# How far below PyTorch's top-1 score the graph's pick may be and still be a near-tie, relative to |score| past 1:
# a few units of the dtype's rounding of that score (fp16's unit is ~1e-3), not TOLERANCE, which bounds probabilities
# (absolute, in [0, 1]); read as a logit window, fp16's 5e-2 took most of a model's top-1 margins (a graph of wrong
# heads, differing at 13 % of positions by 40 ulps, passed as "near-ties").
TIE_TOLERANCE = {"float32": 1e-3, "float16": 1e-2}


def validate_graph(step: StepModel, onnx_path, dtype: str = "float32", threads: int | None = None,
                   kv_layout: str = io_table.SEQUENCE_MAJOR, enforce: bool = True, paths: int = 1,
                   attention: str = "gqa", kv_dtype: str | None = None, approximate: tuple[str, ...] = (),
                   max_positions: int | None = None) -> dict:
    """Max errors per output at every shape; ExportValidationError beyond tolerance when ``enforce``, except for the
    outputs ``approximate`` names (computed another way by design, e.g. int8 heads: recorded, not held to it).
    ``paths`` > 1: a fused graph that verifies trees per path (its tree step has at most that many).
    ``kv_dtype`` "float16": the graph's caches are fp16 (fed rounded; the tolerance is fp16's).
    ``max_positions``: the positions the graph holds (its --max-seq); the shapes' pasts are cut to fit them."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: the optimizer's notes on nodes it leaves are not for users
    if threads:
        opts.intra_op_num_threads = threads
    kernels.register(opts, attention)
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    names_in = [i.name for i in sess.get_inputs()]
    names_out = [o.name for o in sess.get_outputs()]
    torch_dtype = getattr(torch, io_table.model_dtype_of(dtype).name)
    kv_torch = getattr(torch, io_table.model_dtype_of(kv_dtype or dtype).name)
    # The reference runs in fp32 on the weights the graph holds: for a reduced-precision graph, a copy with
    # its weights rounded through that dtype (so this checks the export, not the rounding; the caller's model
    # is left as it is).
    ref_step = step if dtype == "float32" else copy.deepcopy(step).to(torch_dtype).float()
    worst: dict[str, float] = {}
    ties: dict[str, np.ndarray] = {}  # per id output: [ties, positions] over every shape
    tolerance_of = kv_dtype or dtype  # an fp16 cache rounds every key and value: fp16's tolerance
    id_names = {o.name for o in io_table.outputs(1, True) if o.dtype == "int64"}
    gen = torch.Generator().manual_seed(0)
    head_major = kv_layout == io_table.HEAD_MAJOR_SHARED
    shapes = fitted_shapes(max_positions)
    for t, past, tree in shapes:
        torch.manual_seed(int(torch.randint(0, 1 << 30, (1,), generator=gen)))
        inputs = _single(dummy_inputs(ref_step, t=t, past=max(past, 2)), past)
        if kv_torch != torch_dtype:  # the past as the graph's cache holds it: only the step's own rounding differs
            inputs = (*inputs[:4], *(k.to(kv_torch).to(torch_dtype) for k in inputs[4:]))
        if tree:
            inputs = _with_tree(inputs, past, gen, paths)
        ref, hidden = _reference(ref_step, inputs)
        feed = {}
        for n, v in zip(names_in, inputs):
            if n.startswith("past"):
                v = v.to(kv_torch).transpose(1, 2) if head_major else v.to(kv_torch)  # [1, kvh, past, hd]
            feed[n] = v.contiguous().numpy()
        batch = _path_feed(feed, past, paths) if paths > 1 else None
        if "output_rows" in names_in:  # every row's outputs, as the reference computes them
            feed["output_rows"] = np.arange(t, dtype=np.int64)
        got = sess.run(None, feed)
        for name, g, r in zip(names_out, got, ref):
            if head_major and name.startswith("present."):  # the whole cache: compare its T new rows
                g = _node_rows(g, past, batch) if batch else g[:, :, past:past + t].transpose(0, 2, 1, 3)
            if name in id_names:
                scores = partial(reference_scores, ref_step, hidden, name)
                err, tied = id_error(g, r, scores, TIE_TOLERANCE.get(tolerance_of, 0.0))
                ties[name] = ties.get(name, np.zeros(2, np.int64)) + (tied, r[..., 0].size)
            else:
                err = output_error(name, g, r)
            worst[name] = max(worst.get(name, 0.0), err)
    tie_share = {name: float(n / max(total, 1)) for name, (n, total) in ties.items()}
    _check_finite(worst, dtype, kv_dtype)  # quantized graphs too: their errors are recorded, never NaN or infinity
    if enforce:
        _check({k: v for k, v in worst.items() if k not in approximate}, tolerance_of)
        _check_ties({k: v for k, v in tie_share.items() if k not in approximate}, tolerance_of)
    recorded = {"approximate": list(approximate)} if approximate else {}
    return {"shapes": [list(s) for s in shapes], "max_abs_error": worst, "id_ties": tie_share, **recorded,
            "tolerance": TOLERANCE[tolerance_of] if enforce else None,
            "max_id_mismatch": MAX_ID_MISMATCH if enforce else None}


def output_error(name: str, got: np.ndarray, ref: np.ndarray) -> float:
    """How far the graph's output ``got`` is from PyTorch's ``ref``. Ids: the fraction of positions (and heads) whose
    top-1 differs (lower ranks of near-equal logits may swap). Floats: the max absolute difference, infinite where
    the graph gives NaN or infinity and PyTorch does not (a NaN difference counted as none, so such graphs passed).
    ModelError where PyTorch's own output is not finite: the model, not the export, is broken."""
    if ref.dtype == np.int64:
        return float(np.mean(got[..., 0] != ref[..., 0])) if ref.size else 0.0
    if not np.isfinite(ref).all():
        raise ModelError(f"the model's own output {name!r} (PyTorch) holds NaN or infinite values on random inputs: "
                         f"its weights or config.json settings (rope_theta, RoPE scaling) overflow; restore the model")
    diff = np.abs(got.astype(np.float64) - ref)
    return float(np.where(np.isnan(diff), np.inf, diff).max()) if diff.size else 0.0


def id_error(got: np.ndarray, ref: np.ndarray, scores: Callable[[], np.ndarray], tolerance: float) -> tuple[float, int]:
    """The fraction of positions whose top-1 id differs and is no tie, and how many differ as ties: where PyTorch's
    score at the graph's id is within ``tolerance`` (relative past magnitude 1) of its score at its own id, rounding
    could pick either (an fp16 graph failed validation on such near-ties). ``scores()`` gives PyTorch's scores over
    the vocabulary, called only where ids differ."""
    if not ref.size:
        return 0.0, 0
    differ = got[..., 0] != ref[..., 0]
    if not differ.any():
        return 0.0, 0
    table = scores()
    best, picked = _score_at(table, ref[..., 0]), _score_at(table, got[..., 0])
    tied = differ & (best - picked <= tolerance * np.maximum(1.0, np.abs(best)))
    return float(np.mean(differ & ~tied)), int(tied.sum())


def reference_scores(step: StepModel, hidden: torch.Tensor, name: str) -> np.ndarray:
    """PyTorch's scores behind id output ``name``, indexed by token id: the base logits ``[B, T, V]`` or the heads'
    ``[B, T, K, V]`` (-inf outside a draft vocabulary), from the step's final hidden states."""
    with torch.no_grad():
        if name == "next_token_ids":
            return step.lm_head(hidden).float().numpy()
        heads = step.heads(hidden, step.lm_head).float()
        draft = step.heads.draft_ids
        if draft is None:
            return heads.numpy()
        full = torch.full((*heads.shape[:-1], int(draft.max()) + 1), -torch.inf)
        full[..., draft] = heads
        return full.numpy()


def _score_at(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``scores[..., id]`` per position; -inf for an id outside the vocabulary (never a tie)."""
    inside = (ids >= 0) & (ids < scores.shape[-1])
    picked = np.take_along_axis(scores, np.where(inside, ids, 0)[..., None], -1)[..., 0]
    return np.where(inside, picked, -np.inf)


def _reference(step: StepModel, inputs: tuple) -> tuple[list[np.ndarray], torch.Tensor]:
    """PyTorch's outputs as numpy, and the final hidden states they were computed from (for `reference_scores`)."""
    seen: list[torch.Tensor] = []
    hook = step.backbone.register_forward_hook(lambda _m, _a, out: seen.append(out.last_hidden_state))
    try:
        with torch.no_grad():
            outs = step(*inputs)
    finally:
        hook.remove()
    return [r.float().numpy() if r.is_floating_point() else r.numpy() for r in outs], seen[-1]


def fitted_shapes(max_positions: int | None) -> tuple[tuple[int, int, bool], ...]:
    """`SHAPES` with each past cut so that past + T fits ``max_positions``: a fused graph's rotary table holds only
    those positions (ONNX Runtime refused the tree step of a --max-seq under 32 build with a traceback)."""
    if max_positions is None:
        return SHAPES
    return tuple((t, max(0, min(past, max_positions - t)), tree) for t, past, tree in SHAPES)


def _with_tree(inputs: tuple, past: int, gen: torch.Generator, paths: int) -> tuple:
    """The same inputs with a random tree among the T new tokens: each node sees the past, its ancestors and
    itself, and sits at position past + depth (siblings share a position), as in a Medusa step. A graph that
    verifies per path (``paths`` > 1) gets a tree of at most that many paths."""
    ids, pos, mask, temp, *kv = inputs
    t = ids.shape[1]
    tree = torch.eye(t, dtype=torch.bool)
    depth = torch.zeros(t, dtype=torch.long)
    leaves = {0}
    for i in range(1, t):
        pool = list(range(i)) if paths == 1 or len(leaves) < paths else sorted(leaves)
        parent = pool[int(torch.randint(0, len(pool), (1,), generator=gen))]
        leaves = (leaves - {parent}) | {i}
        tree[i] |= tree[parent]
        depth[i] = depth[parent] + 1
    mask = mask.clone()
    mask[0, 0, :, past:] = tree
    return (ids, (past + depth)[None], mask, temp, *kv)


def _path_feed(feed: dict, past: int, paths: int) -> PathBatch:
    """Turn a masked-tree feed into a per-path graph's: rows by depth, a causal mask over them, the path
    inputs, and one copy of the past per path (head groups)."""
    batch = PathBatch.from_mask(feed["attention_mask"][0, 0, :, past:], paths)
    width = batch.path_rows.shape[0]
    mask = np.ones((1, 1, width, past + width), bool)
    mask[0, 0, :, past:] = np.tri(width, dtype=bool)
    feed.update(attention_mask=mask, path_rows=batch.path_rows, node_rows=batch.node_rows)
    for name in [n for n in feed if n.startswith("past_key_values.")]:
        feed[name] = np.concatenate([feed[name]] * paths, axis=1)
    return batch


def _node_rows(present: np.ndarray, past: int, batch: PathBatch) -> np.ndarray:
    """A per-path graph's new KV rows, back in node order: ``[1, nodes, kv_heads, head_dim]``."""
    groups = present.reshape(present.shape[0], batch.paths, -1, *present.shape[2:])  # [1, P, kvh, len, hd]
    depth, path = np.divmod(batch.node_rows, batch.paths)
    return groups[0, path, :, past + depth][None]

def _single(inputs: tuple, past: int) -> tuple:
    """Batch 1, and trim the past to ``past`` rows (0 allowed) keeping mask/positions consistent."""
    ids, pos, mask, temp, *kv = inputs
    t = ids.shape[1]
    keep = mask.shape[-1] - t
    kv = [k[:1, keep - past:] for k in kv]
    mask = mask[:1, :, :, keep - past:]
    return (ids[:1], pos[:1] - (keep - past), mask, temp, *kv)


def _check(worst: dict[str, float], dtype: str) -> None:
    ids = {o.name for o in io_table.outputs(1, True) if o.dtype == "int64"}
    for name, err in worst.items():
        limit = MAX_ID_MISMATCH if name in ids else TOLERANCE[dtype]
        if err > limit:
            raise ExportValidationError(
                f"exported graph output {name!r} differs from PyTorch by {err:.3g} (limit {limit:g}, {dtype}): "
                "the export is wrong; report it with the model type and versions"
            )


def _check_ties(share: dict[str, float], dtype: str) -> None:
    """ExportValidationError where a graph broke more than MAX_ID_TIES of all positions' near-ties its own way."""
    for name, tied in share.items():
        if tied > MAX_ID_TIES:
            raise ExportValidationError(
                f"exported graph output {name!r} differs from PyTorch at {tied:.0%} of positions, all near-ties "
                f"(limit {MAX_ID_TIES:.0%}, {dtype}): the export is wrong; report it with the model type and versions"
            )


def _check_finite(worst: dict[str, float], dtype: str, kv_dtype: str | None = None) -> None:
    """ExportValidationError where the graph gave NaN or infinity and PyTorch numbers (`output_error`), whatever the
    tolerance: no graph of any dtype may (a report of such errors would not be JSON). The advice names what can
    overflow: an fp16 KV cache (keys or values past 65,504), fp16 weights, or neither."""
    for name, err in worst.items():
        if not np.isfinite(err):
            fix = ("its fp16 KV cache overflows: build with --kv-cache-dtype auto" if kv_dtype in ("float16", "fp16") else
                   "build with --dtype fp32" if dtype in ("float16", "fp16") else
                   "report it with the model type and versions")
            raise ExportValidationError(
                f"exported graph output {name!r} holds NaN or infinite values where PyTorch gives numbers ({dtype}): "
                f"{fix}"
            )
