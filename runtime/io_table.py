"""The one table of graph inputs and outputs: names, dtypes and axes. Export (dummy inputs, dynamic axes),
validation, the manifest, every backend's bindings and buffer sizes, and the load-time check of a graph's
I/O all read it, so nothing can drift apart.

    for t in inputs(num_layers):
        t.shape(dims, {BATCH: 1, SEQ: 4, PAST: 100, TOTAL: 104}), t.numpy_dtype(dims.dtype)
    StepOutput.from_named({name: array, ...})     # reduced outputs, by name (runtime.backends.base)

Names follow optimum / onnxruntime-genai. The KV cache is *sequence-major* (``[batch, seq, kv_heads,
head_dim]``): a prefix ``[:past]`` of a preallocated buffer is then contiguous, so backends bind it
without a copy, and the graph's new rows (``present.*``) land in the buffer at ``[past:past+T]``.
The graph reduces the vocabulary inside (top-k ids, probabilities of the inputs, entropy) instead of
shipping full logits for every node and head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Symbolic axes (dynamic in the graph)
BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
CAPACITY = "max_sequence_length"  # a KV buffer's full length (shared-buffer graphs)
# Graphs that verify a tree per path (runtime/tree_paths.py): rows per path, paths, and the KV heads of all paths.
PATH_DEPTH, NUM_PATHS, PATH_KV_HEADS = "path_depth", "num_paths", "path_kv_heads"
# The lanes graph (several sequences per step, `runtime/backends/ort_lanes.py`): all lanes' rows, and per lane b
# its own sizes, named f"lane{b}_..." (symbolic too).
ROWS, LANE_ROWS, LANES = "rows", "lane_rows", "lanes"
# Graphs that take ``output_rows``: how many rows their per-position outputs have.
OUTPUT_ROWS = "output_rows"
SYMBOLIC = (BATCH, SEQ, PAST, TOTAL, CAPACITY, PATH_DEPTH, NUM_PATHS, PATH_KV_HEADS, ROWS, LANE_ROWS, LANES, OUTPUT_ROWS)


def is_symbolic(axis) -> bool:
    return axis in SYMBOLIC or (isinstance(axis, str) and axis.startswith("lane"))

# KV cache layouts. Sequence-major (the portable graph, every backend): the past is a prefix view of the buffer
# and ``present.*`` holds only the T new rows. Head-major shared (the fused ONNX Runtime graph): past and
# present are the same whole buffer, bound to the same memory; GroupQueryAttention writes the new rows in place.
SEQUENCE_MAJOR, HEAD_MAJOR_SHARED = "sequence-major", "head-major-shared"
KV_LAYOUTS = (SEQUENCE_MAJOR, HEAD_MAJOR_SHARED)

# The model dtype: what "float" tensors (the KV cache) hold in a graph of that dtype.
MODEL_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
_FIXED_DTYPES = {"int64": np.dtype(np.int64), "bool": np.dtype(np.bool_), "float32": np.dtype(np.float32)}


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # "int64" | "bool" | "float32" | "float" (= the model dtype, see MODEL_DTYPES)
    axes: tuple  # symbolic axis names (SYMBOLIC) or `ModelDims` field names (fixed per artifact)
    field: str | None = None  # the `StepOutput` field a reduced output fills
    kv: bool = False  # a K or V cache: "float" means the cache's dtype (`ModelDims.cache_dtype`)

    def numpy_dtype(self, model_dtype: str = "float32") -> np.dtype:
        if self.dtype == "float":
            return model_dtype_of(model_dtype)
        return _FIXED_DTYPES[self.dtype]

    def dtype_in(self, dims) -> np.dtype:
        """The numpy dtype in an artifact of ``dims``: a cache's dtype for K / V tensors, else the model's."""
        return self.numpy_dtype(dims.cache_dtype if self.kv else dims.dtype)

    def shape(self, dims, sizes: dict[str, int]) -> tuple[int, ...]:
        """Concrete shape: symbolic axes from ``sizes``, the others from the artifact's ``dims``."""
        fixed = self.fixed_sizes(dims)
        return tuple(fixed[i] if i in fixed else sizes[a] for i, a in enumerate(self.axes))

    def fixed_sizes(self, dims) -> dict[int, int]:
        """``{axis index: size}`` of the axes that are not symbolic (literal sizes and `ModelDims` fields)."""
        return {i: a if isinstance(a, int) else int(getattr(dims, a))
                for i, a in enumerate(self.axes) if not is_symbolic(a)}


def model_dtype_of(name: str) -> np.dtype:
    if name not in MODEL_DTYPES:
        raise ValueError(f"model dtype {name!r} is not one of {', '.join(MODEL_DTYPES)}")
    return MODEL_DTYPES[name]


def token_inputs() -> list[Tensor]:
    """The inputs other than the KV cache."""
    return [
        Tensor("input_ids", "int64", (BATCH, SEQ)),
        Tensor("position_ids", "int64", (BATCH, SEQ)),
        # True = may attend. Past columns first, then the T new tokens (causal for prefill, the tree mask for a step).
        Tensor("attention_mask", "bool", (BATCH, 1, SEQ, TOTAL)),
        # Softmax temperature for the probability outputs; greedy decoding ignores them.
        Tensor("temperature", "float32", (1,)),
    ]


def path_inputs() -> list[Tensor]:
    """The extra inputs of a graph that verifies a tree per path (``paths`` > 1)."""
    return [
        Tensor("path_rows", "int64", (PATH_DEPTH, NUM_PATHS)),  # node at each depth of each path
        Tensor("node_rows", "int64", (SEQ,)),  # depth * paths + path each node is read from
    ]


def row_selection_input() -> Tensor:
    """An optional last input of the fused graphs, one-sequence and lanes (artifacts built before it lack it): the
    rows of the step whose per-position outputs the graph computes (lm_head, reductions, heads), in order. A prompt
    needs only its last row's; a tree step all of them. ``input_token_probs`` is then [B, R, T]; in the lanes graph
    ``row_temperature`` and every output have one row per selected row."""
    return Tensor("output_rows", "int64", (OUTPUT_ROWS,))


def _kv_axes(kv_layout: str, new_rows: bool, paths: int = 1) -> tuple:
    if kv_layout == HEAD_MAJOR_SHARED:
        return (BATCH, "num_kv_heads" if paths == 1 else PATH_KV_HEADS, CAPACITY, "head_dim")
    if kv_layout == SEQUENCE_MAJOR:
        return (BATCH, SEQ if new_rows else PAST, "num_kv_heads", "head_dim")
    raise ValueError(f"unknown KV layout {kv_layout!r}: one of {', '.join(KV_LAYOUTS)}")


def inputs(num_layers: int, kv_layout: str = SEQUENCE_MAJOR, paths: int = 1) -> list[Tensor]:
    table = token_inputs()
    for i in range(num_layers):
        for kind in ("key", "value"):
            table.append(Tensor(f"past_key_values.{i}.{kind}", "float", _kv_axes(kv_layout, False, paths), kv=True))
    return table + (path_inputs() if paths > 1 else [])


def reduced_outputs(medusa: bool) -> list[Tensor]:
    """The small per-position outputs decoding reads (everything but the KV rows), in graph order."""
    table = [
        Tensor("next_token_ids", "int64", (BATCH, SEQ, "sample_topk"), "next_ids"),  # base top-S, best first
        Tensor("next_token_probs", "float32", (BATCH, SEQ, "sample_topk"), "next_probs"),  # at `temperature`
        Tensor("input_token_probs", "float32", (BATCH, SEQ, SEQ), "input_probs"),  # [b, i, j] = p_i(input_ids[b, j])
        Tensor("entropy", "float32", (BATCH, SEQ), "entropy"),  # of p_i at `temperature`
    ]
    if medusa:
        table.append(Tensor("medusa_token_ids", "int64", (BATCH, SEQ, "num_heads", "head_topk"), "medusa_ids"))
    return table


def outputs(num_layers: int, medusa: bool, kv_layout: str = SEQUENCE_MAJOR, paths: int = 1) -> list[Tensor]:
    table = reduced_outputs(medusa)
    for i in range(num_layers):
        for kind in ("key", "value"):
            table.append(Tensor(f"present.{i}.{kind}", "float", _kv_axes(kv_layout, True, paths), kv=True))
    return table


def lane_kv_names(num_layers: int, lane: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{lane}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def lanes_inputs(num_layers: int, lanes: int, gathers: bool = True) -> list[Tensor]:
    """The lanes graph: the rows of every lane back to back, where each lane's attention rows come from
    (``lane_gather``: indices into [a zero row; the rows], lane by lane, each lane's rows then its extra row;
    ``lane_sizes``: rows + 1 per lane) and where the real rows go back (``row_gather``), and per lane the exact
    inputs a one-sequence step gives GroupQueryAttention: positions and additive bias of its rows plus the extra
    row (`backends.ort_lanes.padded_bias`), and its own head-major KV buffers. ``gathers`` False: the graph built
    with the attention kernel, which reads each lane's rows where they are (no ``lane_gather`` / ``row_gather``)."""
    table = [Tensor("input_ids", "int64", (BATCH, ROWS)), Tensor("lane_gather", "int64", (LANE_ROWS,)),
             Tensor("lane_sizes", "int64", (LANES,)), Tensor("row_gather", "int64", (ROWS,)),
             Tensor("row_temperature", "float32", (BATCH, ROWS))]
    if not gathers:
        table = [t for t in table if t.name not in ("lane_gather", "row_gather")]
    for b in range(lanes):
        rows, total, capacity = f"lane{b}_rows", f"lane{b}_total", f"lane{b}_capacity"
        table += [Tensor(f"position_ids.{b}", "int64", (BATCH, rows)),
                  Tensor(f"attention_bias.{b}", "float", (BATCH, 1, rows, total))]
        table += [Tensor(name, "float", (BATCH, "num_kv_heads", capacity, "head_dim"), kv=True)
                  for name in lane_kv_names(num_layers, b, "past_key_values")]
    return table


def lanes_reduced_outputs() -> list[Tensor]:
    """What a lane step returns per row: the base model's top-S and their probabilities, and the entropy."""
    return [t for t in reduced_outputs(False) if t.name != "input_token_probs"]


def lanes_outputs(num_layers: int, lanes: int) -> list[Tensor]:
    table = [Tensor(t.name, t.dtype, (BATCH, ROWS, *t.axes[2:]), t.field) for t in lanes_reduced_outputs()]
    for b in range(lanes):
        table += [Tensor(name, "float", (BATCH, "num_kv_heads", f"lane{b}_capacity", "head_dim"), kv=True)
                  for name in lane_kv_names(num_layers, b, "present")]
    return table


def input_names(num_layers: int) -> list[str]:
    return [t.name for t in inputs(num_layers)]


def output_names(num_layers: int, medusa: bool) -> list[str]:
    return [t.name for t in outputs(num_layers, medusa)]


def reduced_names(medusa: bool) -> list[str]:
    return [t.name for t in reduced_outputs(medusa)]


def kv_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
