"""Which heads to use: an explicit path, the heads shipped for the default model, or fresh ones.

    chosen = resolve_heads(None, loaded)     # shipped heads for the default model, else fresh
    chosen.heads, chosen.description
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .heads import MedusaHeads, load_heads, new_heads
from .model_loading import DEFAULT_MODEL_NAME, LoadedModel

# Trained heads committed with the package (issue: shipped heads for the default model).
SHIPPED_HEADS_DIR = Path(__file__).parent / "shipped_heads" / "smollm2-135m-instruct"


@dataclass
class ChosenHeads:
    heads: MedusaHeads
    description: str
    trained: bool
    path: str | None


def resolve_heads(spec: str | Path | None, loaded: LoadedModel, num_heads: int = 4) -> ChosenHeads:
    """``spec``: a heads path, ``"fresh"`` for untrained heads, or None for the best available."""
    config = loaded.model.config
    if spec is not None and str(spec) != "fresh":
        return ChosenHeads(load_heads(spec, config), f"heads from {spec}", True, str(spec))
    if spec is None and loaded.identity.get("name") == DEFAULT_MODEL_NAME and (SHIPPED_HEADS_DIR / "config.json").exists():
        return ChosenHeads(load_heads(SHIPPED_HEADS_DIR, config), "shipped trained heads", True, str(SHIPPED_HEADS_DIR))
    heads = new_heads(config, num_heads=num_heads, lm_head=loaded.model.get_output_embeddings(),
                      base_model=loaded.identity.get("name", ""))
    return ChosenHeads(heads, "freshly initialised heads (untrained: expect ~1 token per step; "
                       "train them with `medusa-export train-heads`)", False, None)
