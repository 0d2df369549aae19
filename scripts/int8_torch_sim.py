"""Where int8 rows loses agreement, simulated in PyTorch: the smoothed base model with its weights quantized per
output column (to nearest, by GPTQ, or in blocks of 32) and / or every linear's input quantized to int8 per row,
turned per block as the int8 rows graph turns it (32; the lm_head 64); teacher-forced top-1 agreement with the fp32
model's greedy answers and the perplexity change. No ONNX: it separates the weights' share of the loss from the
activations' (docs/quantization.md, "Weights rounded by GPTQ").

    python scripts/int8_torch_sim.py --prompts train_prompts.jsonl --first 40 --count 60 \
        --variants fp32 fp32+act8 nearest nearest+act8 gptq gptq+act8 blocks32 nearest+act8+fp32head

A variant is the weights' rounding (fp32, nearest, gptq, blocksN: blocks of N along the input), then ``+act8``
(activations int8 per row; ``+act16`` int16 per row, ``+act8b32`` int8 per block of 32, ``+actbf16`` bf16),
``+unturned`` (the weights rounded, and the activations quantized, in the input's own basis, not the rotation's;
before the int16 variants the activations were turned all the same), ``+fp32head`` (the base lm_head left fp32,
weights and input: the screened lm_head's exact top words) and / or
``+keep=3,29`` (those decoder layers' linears left fp32, weights and inputs) and / or ``+kv16`` / ``+kv8`` (every
key (rotated) and value row rounded to fp16, or to int8 under its own scale per row and head, as it enters the
cache: what a lower-precision KV cache would hold; ``+kv8c``: the keys per channel instead, each channel's scale the
largest over the whole sequence, which a cache filled token by token cannot know: a bound on per-channel keys;
``+kv8h``: per row and head after an orthonormal Hadamard turn of the head's channels; the general form, int4 and
asymmetric groups included, is in ``rounded_cache``).
``--sweep-layers`` adds, after the variants, each variant with one layer kept at a time: which layers lose the most
agreement. ``--no-smoothing`` quantizes the model without the recipe's activation smoothing (weight-only recipes
have no activations to smooth for). One JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import re
import time

import numpy as np
import torch

from medusa_export.exporter.gptq import input_hessians, round_columns, turned_hessian
from medusa_export.exporter.model_loading import load_base_model
from medusa_export.exporter.quantize import CALIBRATION, RECIPES
from medusa_export.exporter.rotation import InputRotation
from medusa_export.exporter.smoothing import smooth_activations
from medusa_export.runtime.prompts import read_prompts
from script_io import non_negative, positive, prompt_rows, run_main  # noqa: E402

GRAPH_NAMES = {"self_attn.q_proj": "qkv", "self_attn.k_proj": "qkv", "self_attn.v_proj": "qkv",
               "self_attn.o_proj": "o", "mlp.gate_proj": "gate_up", "mlp.up_proj": "gate_up", "mlp.down_proj": "down"}


def graph_name(module_name: str) -> str:
    """The exported graph's MatMul name for a linear (`gptq.input_hessians` keys)."""
    if module_name == "lm_head":
        return "tail//lm_head/MatMul"
    _, _, layer, rest = module_name.split(".", 3)  # model.layers.<i>.<rest>
    return f"L{layer}/{GRAPH_NAMES[rest]}"


def layer_of(module_name: str) -> int | None:
    """The decoder layer a linear belongs to (``model.layers.<i>.…``); None for the lm_head."""
    parts = module_name.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] else None


def rotation_block(name: str, k: int) -> np.ndarray:
    """The [B, B] matrix the int8 rows graph turns each block of this linear's input by."""
    r = InputRotation(RECIPES["int8_rows"]["lm_head_rotation"] if name == "lm_head" else RECIPES["int8_rows"]["rotation"])
    return r.matrix(r.block_of(k))


def block_diagonal(block: np.ndarray, k: int) -> np.ndarray:
    return np.kron(np.eye(k // block.shape[0]), block)


def quantized_weight(w: np.ndarray, how: str, block: np.ndarray, hessian: np.ndarray | None) -> np.ndarray:
    """``w`` [K, N] quantized in the basis turned per ``block`` and turned back (what the graph's product computes)."""
    rotation = block_diagonal(block, w.shape[0])
    turned = rotation.T @ w
    k = turned.shape[0]
    if how.startswith("blocks"):
        size = int(how[len("blocks"):])
        blocks = turned.reshape(k // size, size, -1)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
        step = np.where(step > 0, step, 1.0)
        q = (np.clip(np.rint(blocks / step), -127, 127) * step).reshape(k, -1)
    else:
        step = np.abs(turned).max(axis=0) / 127
        step = np.where(step > 0, step, 1.0)
        if how == "gptq":
            q = round_columns(turned, turned_hessian(hessian, block), step) * step
        else:
            q = np.clip(np.rint(turned / step), -127, 127) * step
    return rotation @ q


ACTIVATIONS = {"act8": (127, None), "act16": (32767, None), "act8b32": (127, 32), "actbf16": (None, None)}


def rounded_rows(t: torch.Tensor, act: str) -> torch.Tensor:
    """``t`` as a kernel would see it: symmetric int8 / int16 under one scale per row (``act8`` / ``act16``) or per
    block of 32 of a row (``act8b32``, llama.cpp's Q8_0 activations), or each element rounded to bf16."""
    levels, block = ACTIVATIONS[act]
    if levels is None:
        return t.bfloat16().float()
    shaped = t.unflatten(-1, (-1, block)) if block else t
    step = shaped.abs().amax(-1, keepdim=True) / levels
    step = torch.where(step > 0, step, torch.ones_like(step))
    return (torch.round(shaped / step).clamp(-levels, levels) * step).reshape(t.shape)


def activation_hooks(model, linears: dict, act: str = "act8", turn: bool = True) -> list:
    """Every linear's input rounded per row as ``act`` (after the graph's turn, and turned back)."""
    handles = []
    for name, module in linears.items():
        k = module.in_features
        r = torch.from_numpy(block_diagonal(rotation_block(name, k), k) if turn else np.eye(k)).float()

        def pre(_module, args, r=r):
            return (rounded_rows(args[0] @ r, act) @ r.T,)

        handles.append(module.register_forward_pre_hook(pre))
    return handles


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of order n (a power of two)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / np.sqrt(n)


CACHE_KIND = re.compile(r"(kv|k|v)(16|8|4)(c|h)?(a)?(?:g(\d+))?")


def rounded_cache(kind: str):
    """A context in which every K / V row entering transformers' DynamicCache is rounded as ``kind``: which part
    ("kv" both; "k" / "v" only the keys / values, the other fp16), the bits (16: fp16; 8 or 4: integers under one
    scale per row and head, symmetric, scale max|x| / (2^(bits-1) - 1)), then optionally "c" (the keys per channel
    over the sequence), "h" (per row after a Hadamard turn of the head's channels), "a" (asymmetric: a scale and a
    zero point per group, 2^bits levels from the group's min to its max) and "gN" (one scale per N channels of a
    row); "" leaves the cache alone. Examples: kv16, kv8, kv8c, kv8h, k8h, v8h, kv8hg16, kv4hag16."""
    import contextlib

    from transformers.cache_utils import DynamicCache

    if not kind:
        return contextlib.nullcontext()
    m = CACHE_KIND.fullmatch(kind)
    if not m or (m[2] == "16" and (m[3] or m[4] or m[5])) or (m[3] == "c" and m[5]):
        raise SystemExit(f"unknown cache rounding {kind!r}: (kv|k|v)(16|8|4)[c|h][a][gN], e.g. kv16, kv8h, kv4hag16")
    which, bits, how, asym, group = m[1], int(m[2]), m[3] or "", bool(m[4]), int(m[5] or 0)

    def rounded_int(x: torch.Tensor, channels: bool = False) -> torch.Tensor:
        shape = x.shape
        if group:
            x = x.reshape(*shape[:-1], shape[-1] // group, group)
        axis = -2 if channels else -1
        if asym:
            low, high = x.amin(axis, keepdim=True), x.amax(axis, keepdim=True)
            step = (high - low) / (2 ** bits - 1)
            step = torch.where(step > 0, step, torch.ones_like(step))
            return (torch.round((x - low) / step) * step + low).reshape(shape)
        top = 2 ** (bits - 1) - 1
        step = x.abs().amax(axis, keepdim=True) / top
        step = torch.where(step > 0, step, torch.ones_like(step))
        return (torch.round(x / step).clamp(-top, top) * step).reshape(shape)

    def rounded(x: torch.Tensor, part: str) -> torch.Tensor:
        if bits == 16 or part not in which:
            return x.half().float()
        if how == "c":
            return rounded_int(x, channels=part == "k")
        if how == "h":
            turn = hadamard(x.shape[-1]).to(x.dtype).to(x.device)
            return rounded_int(x @ turn) @ turn.T
        return rounded_int(x)

    @contextlib.contextmanager
    def patched():
        update = DynamicCache.update
        DynamicCache.update = lambda self, k, v, *a, **kw: update(self, rounded(k, "k"), rounded(v, "v"), *a, **kw)
        try:
            yield
        finally:
            DynamicCache.update = update

    return patched()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--first", type=non_negative, default=40)
    ap.add_argument("--count", type=positive, default=60)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-smoothing", action="store_true", help="quantize the unsmoothed model (weight-only recipes)")
    ap.add_argument("--sweep-layers", action="store_true", help="each variant again with one layer kept fp32 at a time")
    ap.add_argument("--variants", nargs="+", default=["fp32", "fp32+act8", "nearest", "nearest+act8", "gptq",
                                                      "gptq+act8", "blocks32"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_base_model(None)
    model, tok = loaded.model.eval(), loaded.tokenizer
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untied: the embedding stays fp32
    calibration = [tok.encode_prompt(t) for t in read_prompts(None, limit=CALIBRATION.stop)[CALIBRATION]]
    if not args.no_smoothing:
        smooth_activations(model, calibration, RECIPES["int8_rows"]["smooth_alpha"])
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    original = {n: m.weight.detach().clone() for n, m in linears.items()}
    hessians = input_hessians(model, calibration) if any(v.startswith("gptq") for v in args.variants) else {}
    answers = []
    with torch.no_grad():
        for prompt in prompt_rows(args.prompts, args.first, args.count):
            ids = tok.encode_prompt(prompt)
            out = model.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens, do_sample=False)
            answers.append((len(ids), out[0].tolist()))

    def agreement() -> tuple[float, float, int]:
        agree = total = 0
        nll = 0.0
        with torch.no_grad():
            for n, ids in answers:
                logits = model(torch.tensor([ids])).logits[0, n - 1:len(ids) - 1].double()
                target = torch.tensor(ids[n:])
                agree += int((logits.argmax(-1) == target).sum())
                nll -= float(torch.log_softmax(logits, -1)[torch.arange(len(target)), target].sum())
                total += len(target)
        return agree / total, float(np.exp(nll / total)), total

    base_ppl = None
    rounded_weights: dict[tuple[str, str], torch.Tensor] = {}
    layers = model.config.num_hidden_layers
    variants = list(args.variants)
    if args.sweep_layers:
        variants += [f"{v}+keep={i}" for v in args.variants if v != "fp32" for i in range(layers)]
    for variant in variants:
        t0 = time.perf_counter()
        how, *options = variant.split("+")
        act = next((o for o in options if o in ACTIVATIONS), "")
        kept = {int(i) for o in options if o.startswith("keep=") for i in o[5:].split(",")}
        quantized = {n: m for n, m in linears.items()
                     if not ("fp32head" in options and n == "lm_head") and layer_of(n) not in kept}
        if how != "fp32":
            for name, module in quantized.items():
                turn = "unturned" not in options
                if (how, turn, name) not in rounded_weights:  # rounded once per rounding, whatever a variant keeps
                    w = original[name].double().numpy().T
                    block = rotation_block(name, w.shape[0]) if turn else np.eye(1)
                    q = quantized_weight(w, how, block, hessians.get(graph_name(name)))
                    rounded_weights[how, turn, name] = torch.from_numpy(q.T.astype(np.float32).copy())
                module.weight.data = rounded_weights[how, turn, name]  # nothing writes into it: restored by replacing
        handles = activation_hooks(model, quantized, act, "unturned" not in options) if act else []
        with rounded_cache(next((o for o in options if CACHE_KIND.fullmatch(o)), "")):
            top1, ppl, positions = agreement()
        for h in handles:
            h.remove()
        for name, module in linears.items():
            module.weight.data = original[name].clone()
        base_ppl = ppl if variant == "fp32" else base_ppl
        print(json.dumps({"variant": variant, "smoothed": not args.no_smoothing, "prompts": args.prompts, "first": args.first, "count": len(answers),
                          "positions": positions, "top1": round(top1, 4),
                          "perplexity_change": round(ppl / base_ppl - 1, 4) if base_ppl else None,
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    run_main(main)
