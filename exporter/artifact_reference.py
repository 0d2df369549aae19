"""The PyTorch reference for an artifact: the base model it was built from plus the heads it carries.

The manifest records the model's identity, not a path: the model is found with `locate_model` (the built-in
model, where this machine last loaded it, or ``model=PATH``) and must have the recorded fingerprint.
"""

from __future__ import annotations

from pathlib import Path

from medusa_export.runtime.artifact_files import artifact_file
from medusa_export.runtime.manifest import Manifest

from .heads import load_heads
from .model_loading import LoadedModel, check_same_model, load_base_model, locate_model
from .torch_backend import TorchBackend


def artifact_base_model(manifest: Manifest, model: str | None = None) -> LoadedModel:
    """The base model an artifact was built from (ModelError naming ``--model`` when it is not found here)."""
    record = {"name": manifest.model.name, "source": manifest.model.source, "sha256_16": manifest.model.sha256_16}
    loaded = load_base_model(locate_model(record, model))
    check_same_model(loaded, record)
    return loaded


def torch_backend_for_artifact(directory: Path, manifest: Manifest, device: str = "cpu", threads: int | None = None,
                               max_seq: int | None = None, model: str | None = None) -> TorchBackend:
    loaded = artifact_base_model(manifest, model)
    dims = manifest.dims
    heads = None
    if dims.num_heads:
        heads = load_heads(artifact_file(directory, manifest.heads.directory), loaded.model.config)
    if threads:
        import torch

        torch.set_num_threads(threads)
    return TorchBackend(loaded.model, heads, max_seq=min(max_seq or manifest.max_seq, manifest.max_seq),
                        head_topk=dims.head_topk, sample_topk=dims.sample_topk, device=device)
