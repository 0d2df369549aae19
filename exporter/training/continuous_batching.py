"""Answer many prompts with the base model, keeping every slot of a static-cache batch busy.

    for prompt_id, hidden, tokens in answer_all(decoder, lm_head, prompts, eos, max_new_tokens=256):
        ...   # hidden [n, H] float16 (final-norm state H_j), tokens [n] int64 (g_j chosen from H_j)

A slot whose answer ends (EOS or the token budget) is refilled with the next prompt before the next step,
so the step's matmuls keep their full batch (what makes a CPU compute-bound instead of weight-bound).
Sampling draws from a generator seeded per prompt: an answer does not depend on which slot or batch it ran in.
"""

from __future__ import annotations

from collections import deque
from typing import Iterator

import numpy as np
import torch

from medusa_export.runtime.generation_config import MIN_TEMPERATURE

from .static_decoder import StaticDecoder

PREFILL_TOKENS = 8192  # padded prompt tokens per prefill call: bounds the [b, heads, t, t] attention buffer


def answer_all(decoder: StaticDecoder, lm_head: torch.Tensor, prompts: list[list[int]], eos: set[int],
               max_new_tokens: int, temperature: float = 0.0, seeds: list[int] | None = None
               ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (index into ``prompts``, hidden states, tokens) as each answer finishes (not in input order)."""
    slots = decoder.slots
    lm_head = lm_head.detach()
    queue = deque(range(len(prompts)))
    owner = [-1] * slots  # prompt index per slot, -1 when free
    hidden: list[list[torch.Tensor]] = [[] for _ in range(slots)]
    tokens: list[list[int]] = [[] for _ in range(slots)]
    gens: list[torch.Generator | None] = [None] * slots
    last = torch.zeros(slots, dtype=torch.long, device=decoder.device)

    def record(slot_ids: list[int], h: torch.Tensor) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        logits = (h @ lm_head.T).float()
        chosen = _choose(logits, temperature, [gens[s] for s in slot_ids])
        last[slot_ids] = chosen
        h16, chosen_l = h.to(torch.float16).cpu(), chosen.tolist()
        for r, s in enumerate(slot_ids):
            hidden[s].append(h16[r])
            tokens[s].append(chosen_l[r])
            if chosen_l[r] in eos or len(tokens[s]) >= max_new_tokens:
                yield owner[s], torch.stack(hidden[s]).numpy(), np.asarray(tokens[s], np.int64)
                owner[s], hidden[s], tokens[s] = -1, [], []
                decoder.length[s] = 0

    while queue or any(o >= 0 for o in owner):
        free = [s for s in range(slots) if owner[s] < 0]
        while free and queue:
            group = _prefill_group(queue, prompts, len(free))
            used, free = free[:len(group)], free[len(group):]
            for s, i in zip(used, group):
                owner[s] = i
                if temperature >= MIN_TEMPERATURE:
                    gens[s] = torch.Generator(device="cpu").manual_seed(seeds[i] if seeds else i)
            yield from record(used, decoder.prefill([prompts[i] for i in group], used))
        active = [s for s in range(slots) if owner[s] >= 0]
        if not active:
            continue
        h = decoder.step(last, max(active) + 1)
        yield from record(active, h[active])


def _prefill_group(queue: deque, prompts: list[list[int]], room: int) -> list[int]:
    """Next prompts for one prefill call: as many as fit the free slots and the padded-token budget."""
    group = [queue.popleft()]
    longest = len(prompts[group[0]])
    while queue and len(group) < room:
        nxt = max(longest, len(prompts[queue[0]]))
        if nxt * (len(group) + 1) > PREFILL_TOKENS:
            break
        longest = nxt
        group.append(queue.popleft())
    return group


def _choose(logits: torch.Tensor, temperature: float, gens: list[torch.Generator | None]) -> torch.Tensor:
    if temperature < MIN_TEMPERATURE:  # argmax, as generation decodes: logits / 1e-300 are inf, softmax NaN
        return logits.argmax(-1)
    probs = torch.softmax(logits.cpu() / temperature, dim=-1)
    picks = [torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(gens)]
    return torch.cat(picks).to(logits.device)
