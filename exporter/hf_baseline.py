"""Hugging Face `generate` (greedy) as the baseline row in `medusa-export bench`."""

from __future__ import annotations

import time

from medusa_export.runtime.manifest import Manifest

from .artifact_reference import artifact_base_model


def hf_generate_bench(manifest: Manifest, prompts: list[str], max_new_tokens: int, on_prompt=lambda: None,
                      model: str | None = None):
    """Returns (bench row, generated token lists). Stops on the tokenizer's EOS like the runtime does.
    ``model``: the artifact's base model, when this machine does not know where it is."""
    import torch

    loaded = artifact_base_model(manifest, model)
    model, tok = loaded.model, loaded.tokenizer
    eos = list(tok.eos_token_ids) or None
    tokens, new = [], 0
    with torch.inference_mode():
        model.generate(torch.tensor([tok.encode_prompt(prompts[0])]), max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        for p in prompts:
            ids = torch.tensor([tok.encode_prompt(p)])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=eos[0] if eos else None)
            gen = out[0, ids.shape[1]:].tolist()
            gen = gen[: next((i for i, t in enumerate(gen) if t in (eos or [])), len(gen))]
            tokens.append(gen)
            new += len(gen)
            on_prompt()
        wall = time.perf_counter() - t0
    row = {"backend": "transformers", "mode": "vanilla", "tokens_per_s": round(new / wall, 3), "mean_accepted": 1.0,
           "step_ms_p50": None, "step_ms_p90": None, "prefill_ms": None, "identical_to_vanilla": None,
           "new_tokens": new}
    return row, tokens
