"""Open a `Generator` from what the user named: an artifact directory or a model source (PyTorch)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .. import extras
from ..api import check_device
from ..errors import InputError
from ..generator import Generator
from ..tree import Tree, fitted_default

BACKENDS = ("torch", "ort", "trt")
DEFAULT_TREE = "cpu_small_10"


@dataclass
class Opened:
    generator: Generator
    notice: str  # e.g. "freshly initialised heads" — shown to the user when Medusa decoding is on
    model_name: str
    notes: tuple[str, ...] = ()  # the backend's notes (e.g. a TensorRT engine tuned on another GPU): always shown


def is_artifact(path: str | None) -> bool:
    """Whether ``path`` holds a manifest.json, even a broken link (the loader then says what is wrong with it)."""
    return path is not None and os.path.lexists(Path(path) / "manifest.json")


def open_generator(model: str | None, backend: str = "torch", heads: str | None = None, tree: str | None = None,
                   max_seq: int | None = None, device: str = "cpu", threads: int | None = None,
                   plain: bool = False) -> Opened:
    """``plain``: decoding without the heads (`MedusaRuntime.load`'s option of that name)."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    check_device(device)
    if is_artifact(model):
        return _open_artifact(Path(model), backend, heads, tree, max_seq, device, threads, plain)
    if backend != "torch":
        raise InputError(f"backend {backend!r} runs an artifact directory: run `medusa-export build --out DIR` first "
                         f"and pass DIR (got {model or 'the default model'})")
    return _open_torch(model, heads, tree, max_seq or 2048, device)


def _open_torch(model, heads, tree, max_seq, device) -> Opened:
    extras.require("decoding a model with PyTorch (not an artifact)", "torch")
    from medusa_export.exporter.heads_source import resolve_heads
    from medusa_export.exporter.model_loading import load_base_model
    from medusa_export.exporter.torch_backend import TorchBackend

    loaded = load_base_model(model)
    chosen = resolve_heads(heads, loaded)
    backend = TorchBackend(loaded.model, chosen.heads, max_seq=max_seq, device=device)
    spec = tree or _shipped_tree(chosen.path) or DEFAULT_TREE
    t = Tree.from_choices(fitted_default(spec, DEFAULT_TREE, backend.dims.num_heads), topk=backend.dims.head_topk,
                          num_heads=backend.dims.num_heads)
    notice = "" if chosen.trained else f"note: {chosen.description}"
    return Opened(Generator(backend, loaded.tokenizer, t), notice, loaded.identity["name"])


def _shipped_tree(heads_path: str | None) -> str | None:
    """Heads directories may carry the tree calibrated for them (tree.json)."""
    if heads_path and (Path(heads_path) / "tree.json").exists():
        return str(Path(heads_path) / "tree.json")
    return None


def _open_artifact(path: Path, backend, heads, tree, max_seq, device, threads, plain: bool = False) -> Opened:
    from ..api import MedusaRuntime

    if heads is not None:
        raise InputError("--heads applies to a model, not an artifact: the artifact's heads are fused into its graph; "
                         "rebuild with `medusa-export build --heads PATH`")
    if backend == "torch":
        extras.require("--backend torch (the PyTorch reference)", "torch")
    rt = MedusaRuntime.load(path, backend=backend, tree=tree, device=device, threads=threads, max_seq=max_seq,
                            plain=plain)
    notice = "" if rt.manifest.heads.trained else \
        "note: this artifact was built with freshly initialised (untrained) heads"
    return Opened(rt.generator, notice, rt.manifest.model.name, rt.notes)
