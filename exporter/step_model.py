"""The graph every backend runs: backbone (+ fused Medusa heads) with explicit mask, positions and KV,
reduced to what decoding uses. The PyTorch backend calls it eagerly; the ONNX exporter traces it.

    step = StepModel(hf_model, heads, head_topk=10, sample_topk=32)
    outs = step(input_ids, position_ids, attention_mask, temperature, *past)   # tuple in io_table order

I/O names, dtypes and axes: ``medusa_export.runtime.io_table``.
"""

from __future__ import annotations

import torch
from torch import nn

from .heads import MedusaHeads
from .hf_compat import cache_kwargs


class StepModel(nn.Module):
    def __init__(self, model: nn.Module, heads: MedusaHeads | None, head_topk: int = 10, sample_topk: int = 32) -> None:
        super().__init__()
        self.backbone = model.model  # the decoder stack (embeddings .. final norm)
        self.lm_head = model.get_output_embeddings()
        self.heads = heads
        self.config = model.config
        self.head_topk = head_topk
        self.sample_topk = sample_topk

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def forward(self, input_ids, position_ids, attention_mask, temperature, *past):
        from transformers import DynamicCache

        n = self.num_layers
        # Sequence-major KV in, head-major for transformers' cache. Every layer a full one (no config): no graph
        # implements a sliding window, and one that takes effect within the graph's positions is refused before any
        # export (`check_length_effects`), so each layer attends to the whole context. A config's sliding layers keep
        # only their window's rows, a slice the trace records: the portable graph of a model with any window (one of
        # 4096 past a --max-seq of 2048, as Mistral-7B-v0.1's) failed its validation with an ONNX Runtime traceback.
        cache = DynamicCache(
            ddp_cache_data=[(past[2 * i].transpose(1, 2), past[2 * i + 1].transpose(1, 2)) for i in range(n)],
        )
        past_len = past[0].shape[1]
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
            **cache_kwargs(self.backbone, cache),
        ).last_hidden_state  # [B, T, H]
        outs = self.reduced_outputs(hidden, input_ids, temperature)
        for layer in cache.layers[:n]:
            outs.append(layer.keys[:, :, past_len:].transpose(1, 2))
            outs.append(layer.values[:, :, past_len:].transpose(1, 2))
        return tuple(outs)


    def reduced_outputs(self, hidden, input_ids, temperature, padded: bool = False) -> list:
        """From the final hidden states [B, T, H] to the reduced outputs, in I/O-table order. ``padded``: ``hidden``
        carries one extra last row (a copy of the last token's) that the projections see and the outputs drop."""
        logits = self.lm_head(hidden).float()  # [B, T, V]
        if padded:
            logits = logits[:, :-1]
        outs = list(reduce_base_logits(logits, input_ids, temperature, self.sample_topk))
        if self.heads is not None:
            head_logits = self.heads(hidden, self.lm_head)  # [B, T, K, V]
            if padded:
                head_logits = head_logits[:, :-1]
            outs.append(self.heads.to_token_ids(torch.topk(head_logits.float(), self.head_topk, dim=-1).indices))
        return outs


class ReducedTail(nn.Module):
    """`StepModel.reduced_outputs` as a module (hidden, input_ids, temperature -> reduced outputs): the part of
    the step the fused ONNX Runtime graph traces from PyTorch, after its hand-built decoder stack."""

    def __init__(self, step: StepModel, padded: bool = False) -> None:
        super().__init__()
        self.step, self.padded = step, padded

    def forward(self, hidden, input_ids, temperature):
        return tuple(self.step.reduced_outputs(hidden, input_ids, temperature, self.padded))


class LanesTail(nn.Module):
    """The lanes graph's tail (hidden [B, R, H], row_temperature [B, R] -> per row: the base model's top-S ids,
    their probabilities at the row's temperature, the entropy): the same operations as `ReducedTail`'s base part,
    row by row, so a row's numbers equal a one-sequence step's."""

    def __init__(self, step: StepModel) -> None:
        super().__init__()
        self.step = step

    def forward(self, hidden, row_temperature):
        logits = self.step.lm_head(hidden).float()  # [B, R, V]
        top = torch.topk(logits, self.step.sample_topk, dim=-1)
        logp = torch.log_softmax(logits / row_temperature.unsqueeze(-1), dim=-1)
        probs = logp.exp()
        return top.indices, torch.gather(probs, 2, top.indices), -(probs * logp).sum(-1)


def reduce_base_logits(logits: torch.Tensor, input_ids: torch.Tensor, temperature: torch.Tensor, sample_topk: int):
    """Top-S ids and probabilities, the probability of every input token at every position, and entropy."""
    top = torch.topk(logits, sample_topk, dim=-1)
    logp = torch.log_softmax(logits / temperature, dim=-1)  # [B, T, V]
    probs = logp.exp()
    rows = logits.shape[1]  # T, or the rows a graph with `output_rows` selected
    input_probs = torch.gather(probs, 2, input_ids.unsqueeze(1).expand(-1, rows, -1))  # [B, rows, T]
    entropy = -(probs * logp).sum(-1)
    return top.indices, torch.gather(probs, 2, top.indices), input_probs, entropy
