"""Which heads to use: an explicit path, the heads shipped for the default model, or fresh ones.

    chosen = resolve_heads(None, loaded)     # shipped heads for the default model, else fresh
    chosen.heads, chosen.description
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import json

from .heads import MedusaHeads, load_heads, new_heads, restrict_vocab
from .model_loading import DEFAULT_MODEL_NAME, LoadedModel

# Trained heads committed with the package (issue: shipped heads for the default model).
SHIPPED_HEADS_DIR = Path(__file__).parent / "shipped_heads" / "smollm2-135m-instruct"


@dataclass
class ChosenHeads:
    heads: MedusaHeads
    description: str
    trained: bool
    path: str | None


def resolve_heads(spec: str | Path | None, loaded: LoadedModel, num_heads: int = 4,
                  draft_vocab: bool = True) -> ChosenHeads:
    """``spec``: a heads path, ``"fresh"`` for untrained heads, or None for the best available.

    Heads trained on a draft vocabulary (``draft_vocab.json`` beside them) score only those tokens at decode
    time too, unless ``draft_vocab=False``: the projection is their main cost, and they were never trained
    to predict the other tokens.
    """
    config = loaded.model.config
    if spec is not None and str(spec) != "fresh":
        return _with_draft_vocab(ChosenHeads(load_heads(spec, config), f"heads from {spec}", True, str(spec)),
                                 draft_vocab)
    if spec is None and loaded.identity.get("name") == DEFAULT_MODEL_NAME and (SHIPPED_HEADS_DIR / "config.json").exists():
        chosen = ChosenHeads(load_heads(SHIPPED_HEADS_DIR, config), "shipped trained heads", True, str(SHIPPED_HEADS_DIR))
        return _with_draft_vocab(chosen, draft_vocab)
    heads = new_heads(config, num_heads=num_heads, lm_head=loaded.model.get_output_embeddings(),
                      base_model=loaded.identity.get("name", ""))
    return ChosenHeads(heads, "freshly initialised heads (untrained: expect ~1 token per step; "
                       "train them with `medusa-export train-heads`)", False, None)


def _with_draft_vocab(chosen: ChosenHeads, enabled: bool) -> ChosenHeads:
    path = Path(chosen.path) if chosen.path else None
    vocab_file = (path if path.is_dir() else path.parent) / "draft_vocab.json" if path else None
    if not enabled or vocab_file is None or not vocab_file.exists() or chosen.heads.draft_ids is not None:
        return chosen
    ids = json.loads(vocab_file.read_text())["ids"]
    chosen.heads = restrict_vocab(chosen.heads, ids)
    chosen.description += f" (draft vocabulary of {len(ids)} tokens)"
    return chosen
