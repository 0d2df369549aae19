"""The PyTorch reference for an artifact: the base model it was built from plus the heads it carries."""

from __future__ import annotations

from pathlib import Path

from medusa_export.runtime.errors import ArtifactError

from .heads import load_heads
from .model_loading import load_base_model
from .torch_backend import TorchBackend


def torch_backend_for_artifact(directory: Path, manifest: dict, device: str = "cpu", threads: int | None = None,
                               max_seq: int | None = None) -> TorchBackend:
    source = manifest["model"].get("source")
    try:
        loaded = load_base_model(source)
    except Exception as e:
        raise ArtifactError(f"the artifact's base model {source!r} cannot be loaded for the PyTorch reference: {e}") from None
    dims = manifest["dims"]
    heads = load_heads(Path(directory) / manifest["heads"]["directory"], loaded.model.config) if dims["num_heads"] else None
    if threads:
        import torch

        torch.set_num_threads(threads)
    return TorchBackend(loaded.model, heads, max_seq=min(max_seq or manifest["max_seq"], manifest["max_seq"]),
                        head_topk=dims["head_topk"], sample_topk=dims["sample_topk"], device=device)
