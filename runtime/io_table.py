"""The one table of graph inputs and outputs: names, dtypes and axes. Export, validation, the manifest and
every backend read it, so the names cannot drift apart.

Names follow optimum / onnxruntime-genai. The KV cache is *sequence-major* (``[batch, seq, kv_heads,
head_dim]``): a prefix ``[:past]`` of a preallocated buffer is then contiguous, so backends bind it
without a copy, and the graph's new rows (``present.*``) land in the buffer at ``[past:past+T]``.
The graph reduces the vocabulary inside (top-k ids, probabilities of the inputs, entropy) instead of
shipping full logits for every node and head.
"""

from __future__ import annotations

from dataclasses import dataclass

# Axis names
BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # "int64" | "bool" | "float" (the model dtype) | "float32"
    axes: tuple  # str = symbolic axis, int = fixed size, or a key of the model dims (e.g. "kv_heads")


def inputs(num_layers: int) -> list[Tensor]:
    table = [
        Tensor("input_ids", "int64", (BATCH, SEQ)),
        Tensor("position_ids", "int64", (BATCH, SEQ)),
        # True = may attend. Past columns first, then the T new tokens (causal for prefill, the tree mask for a step).
        Tensor("attention_mask", "bool", (BATCH, 1, SEQ, TOTAL)),
        # Softmax temperature for the probability outputs; greedy decoding ignores them.
        Tensor("temperature", "float32", (1,)),
    ]
    for i in range(num_layers):
        for kind in ("key", "value"):
            table.append(Tensor(f"past_key_values.{i}.{kind}", "float", (BATCH, PAST, "kv_heads", "head_dim")))
    return table


def outputs(num_layers: int, medusa: bool) -> list[Tensor]:
    table = [
        Tensor("next_token_ids", "int64", (BATCH, SEQ, "sample_topk")),  # base top-S, best first
        Tensor("next_token_probs", "float32", (BATCH, SEQ, "sample_topk")),  # their probabilities at `temperature`
        Tensor("input_token_probs", "float32", (BATCH, SEQ, SEQ)),  # [b, i, j] = p_i(input_ids[b, j])
        Tensor("entropy", "float32", (BATCH, SEQ)),  # of p_i at `temperature`
    ]
    if medusa:
        table.append(Tensor("medusa_token_ids", "int64", (BATCH, SEQ, "num_heads", "head_topk")))
    for i in range(num_layers):
        for kind in ("key", "value"):
            table.append(Tensor(f"present.{i}.{kind}", "float", (BATCH, SEQ, "kv_heads", "head_dim")))
    return table


def input_names(num_layers: int) -> list[str]:
    return [t.name for t in inputs(num_layers)]


def output_names(num_layers: int, medusa: bool) -> list[str]:
    return [t.name for t in outputs(num_layers, medusa)]


def kv_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
