"""A Llama-family decoder with a preallocated KV cache and one row per slot, for batched self-distillation.

    dec = StaticDecoder(model, slots=64, capacity=1280)
    h = dec.prefill(tokens, slot_ids, lengths)      # [b, H] final-norm hidden state at each prompt's last token
    h = dec.step(last_tokens, active_slots)         # [s, H]: one new token for every slot in 0..s-1

Why not the Hugging Face forward with ``DynamicCache``: that cache grows by concatenation (every step copies
every layer's keys), left padding makes every row pay for the longest prompt, and a finished row can only
leave, not be replaced. Here each slot owns a fixed region of one cache tensor, a slot is refilled with the
next prompt the moment its answer ends (continuous batching), and each row attends only to its own length.
The weights are the model's own modules' tensors (no copy); the arithmetic is Llama's (RMSNorm, rotate-half
rotary from the model's rotary module, grouped-query attention, SiLU-gated MLP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medusa_export.runtime.errors import ModelError


def unsupported(config) -> str | None:
    """Why this decoder cannot run ``config`` (then distillation uses the Hugging Face forward), or None."""
    if config.model_type not in ("llama", "mistral", "qwen2"):
        return f"model type {config.model_type!r}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    return None


class StaticDecoder:
    def __init__(self, model, slots: int, capacity: int):
        reason = unsupported(model.config)
        if reason:
            raise ModelError(f"the static-cache decoder does not cover {reason}")
        cfg = model.config
        dec = model.model
        self.model = model
        self.device = dec.embed_tokens.weight.device
        self.eps = cfg.rms_norm_eps
        self.nh, self.kvh = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.nh
        self.layers = list(dec.layers)
        self.slots, self.capacity = slots, capacity
        shape = (len(self.layers), slots, self.kvh, capacity, self.hd)
        self.k = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self.v = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self.length = torch.zeros(slots, dtype=torch.long, device=self.device)  # tokens cached per slot
        # cos/sin for every position a slot can reach, from the model's rotary module (covers its scaling).
        with torch.no_grad():
            pos = torch.arange(capacity, device=self.device)[None]
            cos, sin = dec.rotary_emb(torch.zeros(1, 1, self.hd, device=self.device), pos)
        self.cos, self.sin = cos[0].float(), sin[0].float()  # [capacity, hd]
        self.norm = dec.norm

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], slot_ids: list[int]) -> torch.Tensor:
        """Run whole prompts into the given (free) slots; returns each prompt's last hidden state [b, H]."""
        b, t = len(prompts), max(len(p) for p in prompts)
        if t > self.capacity:
            raise ModelError(f"a prompt of {t} tokens does not fit the distillation cache of {self.capacity}")
        ids = torch.zeros(b, t, dtype=torch.long, device=self.device)
        for r, p in enumerate(prompts):
            ids[r, :len(p)] = torch.tensor(p)  # right padding: causal attention keeps pads out of real rows
        slots = torch.tensor(slot_ids, device=self.device)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        pos = torch.arange(t, device=self.device)
        cos, sin = self.cos[pos][None, None], self.sin[pos][None, None]
        x = self.model.model.embed_tokens(ids)
        for li, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)  # [b, heads, t, hd]
            self.k[li, slots, :, :t] = k
            self.v[li, slots, :, :t] = v
            a = F.scaled_dot_product_attention(q, _repeat_kv(k, self.nh // self.kvh), _repeat_kv(v, self.nh // self.kvh),
                                               is_causal=True)
            x = self._finish_layer(layer, x, a)
        self.length[slots] = lengths
        last = x[torch.arange(b, device=self.device), lengths - 1]
        return self.norm(last)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, rows: int) -> torch.Tensor:
        """One token for each of slots 0..rows-1 (idle slots compute and are ignored); returns [rows, H]."""
        pos = self.length[:rows]
        if int(pos.max()) >= self.capacity:
            raise ModelError(f"a slot reached the distillation cache's capacity of {self.capacity} tokens")
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]
        span = int(pos.max()) + 1
        # Each row sees its own keys only: [rows, 1, 1, span] additive mask.
        bias = torch.where(torch.arange(span, device=self.device)[None] <= pos[:, None], 0.0, float("-inf"))
        bias = bias[:, None, None]
        x = self.model.model.embed_tokens(tokens[:rows, None])
        ar = torch.arange(rows, device=self.device)
        g = self.nh // self.kvh
        for li, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)  # q [rows, nh, 1, hd], k/v [rows, kvh, 1, hd]
            self.k[li, ar, :, pos] = k[:, :, 0]
            self.v[li, ar, :, pos] = v[:, :, 0]
            keys, vals = self.k[li, :rows, :, :span], self.v[li, :rows, :, :span]  # views, no copy
            qg = q.reshape(rows, self.kvh, g, self.hd)  # query heads of one KV head share its keys
            scores = torch.matmul(qg, keys.transpose(-1, -2)) * self.hd ** -0.5 + bias
            a = torch.matmul(torch.softmax(scores, dim=-1), vals).reshape(rows, self.nh, 1, self.hd)
            x = self._finish_layer(layer, x, a)
        self.length[:rows] += 1
        return self.norm(x[:, 0])

    def _qkv(self, layer, x, cos, sin):
        at = layer.self_attn
        h = layer.input_layernorm(x)
        b, t, _ = h.shape
        q = at.q_proj(h).view(b, t, self.nh, self.hd).transpose(1, 2)
        k = at.k_proj(h).view(b, t, self.kvh, self.hd).transpose(1, 2)
        v = at.v_proj(h).view(b, t, self.kvh, self.hd).transpose(1, 2)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def _finish_layer(self, layer, x, a):
        b, _, t, _ = a.shape
        x = x + layer.self_attn.o_proj(a.transpose(1, 2).reshape(b, t, self.nh * self.hd))
        return x + layer.mlp(layer.post_attention_layernorm(x))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)
