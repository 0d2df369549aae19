"""Activation smoothing before int8 weights (SmoothQuant, Xiao et al. 2023, arXiv 2211.10438): a per-channel scale
moved from the activations into the weights, so the quantized matmuls see inputs without outlier channels.

    scales = smooth_activations(model, calibration_ids, alpha=0.5)   # in place, on a copy you own

`MatMulNBits` at accuracy level 4 quantizes each row's activations per block of 32 channels at run time. The
RMSNorm outputs that feed q/k/v and gate/up carry a few channels far larger than the rest, so the block holding
one loses the others' precision. For channel j, with ``a_j`` the largest |activation| seen on calibration text and
``w_j`` the largest |weight| reading it, ``s_j = a_j ** alpha / w_j ** (1 - alpha)``: the norm's weight is divided
by s and the projections' input rows multiplied by it. In exact arithmetic the model is unchanged (fp32 differs in
the last bits); only the quantized graphs are built from the smoothed copy.
"""

from __future__ import annotations

import torch

# Scales are kept within [1 / LIMIT, LIMIT]: a channel that never fired on the calibration text keeps its weight.
LIMIT = 100.0


def _groups(layer) -> list[tuple[str, torch.nn.Module, list[torch.nn.Linear]]]:
    """(name, RMSNorm, the projections reading its output) of one Llama / Mistral / Qwen2 decoder layer."""
    attn, mlp = layer.self_attn, layer.mlp
    return [("qkv", layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
            ("gate_up", layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])]


@torch.no_grad()
def input_maxima(model, calibration_ids: list[list[int]], modules: dict) -> dict:
    """For each of ``modules`` (key -> module of ``model``), the largest |input| of each channel over every token of
    the calibration sequences."""
    maxima: dict = {}

    def record(key):
        def hook(_module, inputs):
            x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0).float()
            maxima[key] = torch.maximum(maxima[key], x) if key in maxima else x
        return hook

    hooks = [module.register_forward_pre_hook(record(key)) for key, module in modules.items()]
    try:
        for ids in calibration_ids:
            model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return maxima


def activation_maxima(model, calibration_ids: list[list[int]]) -> dict[tuple[int, str], torch.Tensor]:
    """Per layer and group, the largest |input| of each channel over every token of the calibration sequences."""
    first = {(i, name): linears[0] for i, layer in enumerate(model.model.layers)  # all of a group read one input
             for name, _norm, linears in _groups(layer)}
    return input_maxima(model, calibration_ids, first)


def smoothing_scales(a: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per channel ``a ** alpha / w ** (1 - alpha)`` from its largest |activation| ``a`` and largest |weight| ``w``,
    within [1 / LIMIT, LIMIT]; 1 (the channel left as it is) where either is NaN, which clamping passes on and which
    would have made every weight reading the channel NaN."""
    s = (a.clamp(min=1e-5) ** alpha / w.clamp(min=1e-5) ** (1 - alpha)).clamp(1 / LIMIT, LIMIT)
    return torch.where(torch.isnan(s), torch.ones_like(s), s)


def _finite_after(s: torch.Tensor, norm_weight: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``s`` with 1 on the channels where dividing the norm's weight or multiplying the weights reading it [out, in]
    by ``s`` would leave float32's range (weights near 3e38): smoothing must not turn a finite model infinite."""
    ok = torch.isfinite(norm_weight.float() / s) & torch.isfinite(weights.float() * s).all(0)
    return torch.where(ok, s, torch.ones_like(s))


@torch.no_grad()
def smooth_activations(model, calibration_ids: list[list[int]], alpha: float) -> dict[tuple[int, str], torch.Tensor]:
    """Fold SmoothQuant scales into ``model`` (in place) from its activations on ``calibration_ids``; the scales."""
    if not calibration_ids or not 0.0 < alpha < 1.0:
        raise ValueError("smoothing needs calibration sequences and 0 < alpha < 1")
    maxima = activation_maxima(model, calibration_ids)
    scales = {}
    for i, layer in enumerate(model.model.layers):
        for name, norm, linears in _groups(layer):
            weights = torch.cat([lin.weight for lin in linears])
            s = _finite_after(smoothing_scales(maxima[(i, name)], weights.abs().amax(0).float(), alpha), norm.weight,
                              weights)
            norm.weight.div_(s.to(norm.weight.dtype))
            for lin in linears:
                lin.weight.mul_(s.to(lin.weight.dtype))  # [out, in]: scales the input channels
            scales[(i, name)] = s
    return scales
