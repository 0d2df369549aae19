"""Medusa-2's losses: the joint training loss and the held-out evaluation of backbone and heads.

Both run the backbone twice on the same batch of self-distilled sequences: fine-tuned (adapters on) and original
(adapters off, or the frozen copy of full fine-tuning), and compare them at the answer positions.
"""

from __future__ import annotations

import numpy as np
import torch

from .evaluate import evaluate_heads
from .examples import IGNORE, Examples
from .medusa2_batches import Sequence
from .train import HeadsLoss


def _forward_hidden(model, batch: list[Sequence], dev) -> torch.Tensor:
    """Final-norm hidden states at every answer position of the batch: [N, H]."""
    width = max(len(s.ids) for s in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long, device=dev)
    rows, cols = [], []
    for r, s in enumerate(batch):
        ids[r, :len(s.ids)] = torch.as_tensor(s.ids)
        n = len(s.targets)
        rows += [r] * n
        cols += range(s.first, s.first + n)
    # Right padding under the causal mask: a real position never sees a pad, so no attention mask is needed,
    # and without one SDPA keeps to its fused kernel instead of materialising [B, heads, L, L] scores.
    hidden = model.model(input_ids=ids).last_hidden_state
    return hidden[torch.tensor(rows), torch.tensor(cols)]


def _original_hidden(model, teacher, lora, student, batch, dev) -> torch.Tensor:
    with torch.no_grad():
        if lora is None:
            return _forward_hidden(teacher, batch, dev)
        with student.disable_adapter():
            return _forward_hidden(model, batch, dev)


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p_original || p_finetuned), full vocabulary."""
    log_t = torch.log_softmax(teacher_logits, dim=-1)
    log_s = torch.log_softmax(student_logits, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def joint_loss(model, teacher, lora, student, heads_loss: HeadsLoss, batch, vocab, dev):
    hs = _forward_hidden(model, batch, dev)
    ht = _original_hidden(model, teacher, lora, student, batch, dev)
    lm_weight = model.get_output_embeddings().weight
    kl = _kl(ht @ lm_weight.detach().T, hs @ lm_weight.detach().T)
    targets = torch.as_tensor(np.concatenate([s.targets for s in batch]), device=dev)
    if vocab is not None:
        targets = torch.as_tensor(vocab.remap(targets.cpu().numpy(), lm_weight.shape[0]), device=dev)
    medusa, per_head = heads_loss(hs, targets)
    return kl, medusa, per_head


@torch.no_grad()
def evaluate_joint(model, teacher, lora, student, heads, lm_weight, held: list[Sequence], dev, adapters: bool) -> dict:
    """Fine-tuned vs original on held-out answers (teacher-forced top-1 agreement, mean KL) and the heads'
    held-out accuracy on the current backbone (``adapters=False``: on the original, i.e. before joint training)."""
    agree = total = 0
    kl_sum = 0.0
    hidden, targets = [], []
    for s in range(0, len(held), 8):
        batch = held[s:s + 8]
        ht = _original_hidden(model, teacher, lora, student, batch, dev)
        hs = _forward_hidden(model, batch, dev) if adapters else ht
        logits_t, logits_s = ht @ lm_weight.T, hs @ lm_weight.T  # once each, for the agreement and the KL
        agree += int((logits_s.argmax(-1) == logits_t.argmax(-1)).sum())
        total += len(hs)
        kl_sum += float(_kl(logits_t, logits_s)) * len(hs)
        hidden.append(hs.float().cpu().numpy())
        targets.append(np.concatenate([x.targets for x in batch]))
    ex = Examples(np.concatenate(hidden), np.concatenate(targets),
                  np.concatenate([[x.prompt_index] * len(x.targets) for x in held]))
    keep = np.flatnonzero(ex.targets[:, 0] != IGNORE)
    return {"backbone": {"top1_agreement": round(agree / max(1, total), 5), "mean_kl": round(kl_sum / max(1, total), 6),
                         "positions": total},
            "heads": evaluate_heads(heads, lm_weight, ex.subset(keep), device=dev)}
