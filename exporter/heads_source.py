"""Which heads to use: an explicit path, heads inside the model (Medusa-2 layout), the heads shipped for the
default model, or fresh ones.

    chosen = resolve_heads(None, loaded)     # embedded heads, else shipped heads for the default model, else fresh
    chosen.heads, chosen.description, chosen.source_name

A Medusa-2 checkpoint (the reference's joint fine-tuning) keeps its heads in the model's own safetensors
(``medusa_head.{head}.{layer}.linear.*`` next to the backbone) with ``medusa_num_heads`` /
``medusa_num_layers`` in ``config.json``: such a directory loads with its heads and no ``--heads``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from medusa_export.runtime.errors import HeadsError, first_line

from .heads import (MedusaHeads, check_draft_ids, heads_from_state, load_heads, new_heads, read_heads_json,
                    reference_state, restrict_vocab)
from .model_loading import DEFAULT_MODEL_NAME, LoadedModel

# Trained heads committed with the package (issue: shipped heads for the default model).
SHIPPED_HEADS_DIR = Path(__file__).parent / "shipped_heads" / "smollm2-135m-instruct"
EMBEDDED_PREFIX = "medusa_head."


@dataclass
class ChosenHeads:
    heads: MedusaHeads
    description: str
    trained: bool
    path: str | None  # on this machine (never recorded)
    source_name: str | None = None  # what records keep: "shipped/<name>", "model" (embedded), a directory name


def resolve_heads(spec: str | Path | None, loaded: LoadedModel, num_heads: int = 4,
                  draft_vocab: bool = True) -> ChosenHeads:
    """``spec``: a heads path, ``"fresh"`` for untrained heads, or None for the best available.

    Heads trained on a draft vocabulary (``draft_vocab.json`` beside them) score only those tokens at decode
    time too, unless ``draft_vocab=False``: the projection is their main cost, and they were never trained
    to predict the other tokens.
    """
    config = loaded.model.config
    if spec is not None and str(spec) != "fresh":
        return _with_draft_vocab(ChosenHeads(load_heads(spec, config), f"heads from {spec}", True, str(spec),
                                             Path(spec).name), draft_vocab)
    if spec is None and loaded.path is not None and loaded.path.is_dir():
        embedded = load_embedded_heads(loaded.path, config)
        if embedded is not None:
            return _with_draft_vocab(ChosenHeads(embedded, "heads inside the model (Medusa-2 layout)", True,
                                                 str(loaded.path), "model"), draft_vocab)
    if spec is None and loaded.identity.get("name") == DEFAULT_MODEL_NAME and (SHIPPED_HEADS_DIR / "config.json").exists():
        chosen = ChosenHeads(load_heads(SHIPPED_HEADS_DIR, config), "shipped trained heads", True,
                             str(SHIPPED_HEADS_DIR), f"shipped/{SHIPPED_HEADS_DIR.name}")
        return _with_draft_vocab(chosen, draft_vocab)
    heads = new_heads(config, num_heads=num_heads, lm_head=loaded.model.get_output_embeddings(),
                      base_model=loaded.identity.get("name", ""))
    return ChosenHeads(heads, "freshly initialised heads (untrained: expect ~1 token per step; "
                       "train them with `medusa-export train-heads`)", False, None, "fresh")


def load_embedded_heads(model_dir: Path, base_config) -> MedusaHeads | None:
    """The heads of a Medusa-2 model directory, or None when its config.json has no Medusa settings."""
    try:
        meta = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if "medusa_num_heads" not in meta:
        return None
    from safetensors import safe_open

    raw = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key.startswith(EMBEDDED_PREFIX):
                        raw[key] = f.get_tensor(key)
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors' own error for a header or data it cannot read
            raise HeadsError(f"{file} is not a readable safetensors file ({first_line(e, 120)}): restore it, or move "
                             f"it out of the model directory") from None
    if not raw:
        raise HeadsError(f"{model_dir / 'config.json'} sets medusa_num_heads but no {EMBEDDED_PREFIX}* tensors are in "
                         f"its safetensors: save the heads with the model, or pass --heads")
    state, cfg = reference_state(raw, meta, base_config, model_dir)
    return heads_from_state(state, cfg, base_config, model_dir)


def _with_draft_vocab(chosen: ChosenHeads, enabled: bool) -> ChosenHeads:
    path = Path(chosen.path) if chosen.path else None
    vocab_file = (path if path.is_dir() else path.parent) / "draft_vocab.json" if path else None
    if not enabled or vocab_file is None or not vocab_file.exists() or chosen.heads.draft_ids is not None:
        return chosen
    data = read_heads_json(vocab_file)
    ids = check_draft_ids(data.get("ids"), chosen.heads.config.vocab_size, str(vocab_file))
    chosen.heads = restrict_vocab(chosen.heads, ids)
    chosen.description += f" (draft vocabulary of {len(ids)} tokens)"
    return chosen
