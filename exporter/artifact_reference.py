"""The PyTorch reference for an artifact: the base model it was built from plus the heads it carries.

The manifest records the model's identity, not a path: the model is found with `locate_model` (the built-in
model, where this machine last loaded it, or ``model=PATH``) and must have the recorded fingerprint.
"""

from __future__ import annotations

from pathlib import Path

from medusa_export.runtime.artifact_files import artifact_file
from medusa_export.runtime.errors import ArtifactError
from medusa_export.runtime.manifest import Manifest

from .heads import (HEADS_FORMAT, WEIGHTS_FILE, MedusaHeads, heads_config, heads_from_state, read_heads_json,
                    read_tensors)
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
    heads = artifact_heads(directory, manifest, loaded.model.config) if dims.num_heads else None
    if threads:
        import torch

        torch.set_num_threads(threads)
    return TorchBackend(loaded.model, heads, max_seq=min(max_seq or manifest.max_seq, manifest.max_seq),
                        head_topk=dims.head_topk, sample_topk=dims.sample_topk, device=device)


def artifact_heads(directory: Path, manifest: Manifest, base_config) -> MedusaHeads:
    """The heads an artifact carries, read only from the two files build writes and the manifest lists (inside
    the artifact, of their recorded sizes): our format's config.json and safetensors, never a reference layout or
    a pickle, and nothing else in that folder."""
    folder = manifest.heads.directory
    if not isinstance(folder, str) or not folder:
        raise ArtifactError(f"{directory / 'manifest.json'} records no heads directory: rebuild the artifact")
    cfg_file, weights = (_listed(directory, manifest, f"{folder}/{name}") for name in ("config.json", WEIGHTS_FILE))
    heads_dir = artifact_file(directory, folder)
    for entry in heads_dir.iterdir():  # anything there the manifest does not list is refused (Manifest.listed_file)
        manifest.listed_file(directory, f"{folder}/{entry.name}")
    meta = read_heads_json(cfg_file)
    if meta.get("format") != HEADS_FORMAT:
        raise ArtifactError(f"{cfg_file} is not medusa-export heads (format {meta.get('format')!r:.40}): rebuild "
                            f"the artifact")
    cfg = heads_config(meta, cfg_file)
    built = (manifest.dims.num_heads, manifest.heads.num_layers, manifest.heads.layout)
    if (cfg.num_heads, cfg.num_layers, cfg.layout) != built:  # else a tree that fits the graphs "does not fit"
        raise ArtifactError(f"{cfg_file} describes {cfg.num_heads} heads of {cfg.num_layers} layers ({cfg.layout}), "
                            f"but the manifest's graphs were built with {built[0]} of {built[1]} ({built[2]}): the "
                            f"heads were replaced; rebuild the artifact")
    return heads_from_state(read_tensors(weights), cfg, base_config, heads_dir)


def _listed(directory: Path, manifest: Manifest, name: str) -> Path:
    path = manifest.listed_file(directory, name)
    if path is None:
        raise ArtifactError(f"{directory / name} is not listed in the manifest: rebuild the artifact")
    return path
