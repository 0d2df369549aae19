"""Library API for services: load an artifact once, then generate or stream, from any thread.

    from medusa_export.runtime import MedusaRuntime
    rt = MedusaRuntime.load("artifacts/smollm2", backend="ort", threads=2)
    result = rt.generate("Explain KV caches in one line.", max_new_tokens=64)
    for event in rt.stream("Tell me a story", temperature=0.7, seed=1):
        print(event.text, end="")

Each call gets its own session (KV buffers and I/O bindings); the loaded graph is shared. ``rt.notes``
holds what the user should be told (e.g. a TensorRT engine tuned on another GPU). ``rt.close()`` (or
``with MedusaRuntime.load(...) as rt:``) frees the graphs or engines and device memory at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .decode import GenerationConfig
from .errors import InputError, TreeError
from .generator import GenerationResult, Generator, Stream
from .manifest import manifest_dims, read_manifest
from .tokenizer import ChatTokenizer
from .tree import Tree, load_choices


@dataclass
class MedusaRuntime:
    manifest: dict
    generator: Generator

    @classmethod
    def load(cls, directory: str | Path, backend: str = "ort", tree: str | None = None, device: str = "cpu",
             threads: int | None = None, max_seq: int | None = None, check_hashes: bool = False,
             model: str | None = None) -> "MedusaRuntime":
        """``check_hashes``: verify every file's sha256 (sizes are always checked). ``model``: the base model's
        directory or .gguf for the PyTorch reference backend, when this machine does not know where it is."""
        directory = Path(directory)
        manifest = read_manifest(directory, check_hashes=check_hashes)
        dims = manifest_dims(manifest)
        tokenizer = ChatTokenizer.from_directory(directory)
        options = {"model": model} if backend == "torch" else {}
        engine = open_backend(directory, manifest, backend, device=device, threads=threads, max_seq=max_seq, **options)
        return cls(manifest, Generator(engine, tokenizer, artifact_tree(manifest, dims, tree)))

    @property
    def notes(self) -> tuple[str, ...]:
        return tuple(self.generator.backend.notes)

    def close(self) -> None:
        self.generator.backend.close()

    def __enter__(self) -> "MedusaRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompt: str | list[int], **options) -> GenerationResult:
        return self.generator.generate(prompt, GenerationConfig(**options))

    def stream(self, prompt: str | list[int], **options) -> Stream:
        return self.generator.stream(prompt, GenerationConfig(**options))


def artifact_tree(manifest: dict, dims, spec: str | None) -> Tree | None:
    """The artifact's own tree, or another one that fits its graph (depth <= heads, rank < graph top-k)."""
    if not dims.num_heads:
        return None
    choices = load_choices(spec) if spec else manifest["tree"]["medusa_choices"]
    try:
        return Tree.from_choices(choices, topk=dims.head_topk, num_heads=dims.num_heads)
    except TreeError as e:
        raise TreeError(f"{e} (the exported graph has {dims.num_heads} heads with top-{dims.head_topk} each)") from None


def open_backend(directory: Path, manifest: dict, backend: str, **options):
    dims = manifest_dims(manifest)
    if backend == "ort":
        from .backends.ort import OrtBackend

        return OrtBackend(directory, manifest, dims, **options)
    if backend == "trt":
        from .backends.trt import TrtBackend

        return TrtBackend(directory, manifest, dims, **options)
    if backend == "torch":
        from medusa_export.exporter.artifact_reference import torch_backend_for_artifact

        return torch_backend_for_artifact(directory, manifest, **options)
    raise InputError(f"unknown backend {backend!r}: choose ort, trt or torch")
