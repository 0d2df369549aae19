"""medusa_export.runtime: the torch-free Medusa runtime (numpy + ONNX Runtime / TensorRT).

    from medusa_export.runtime import MedusaRuntime
    rt = MedusaRuntime.load("artifacts/smollm2", backend="ort")
    print(rt.generate("Write a haiku about caches.").text)

Nothing here imports torch or transformers; the PyTorch reference backend lives in
``medusa_export.exporter`` and is only imported when asked for.
"""

from __future__ import annotations

__version__ = "0.2.0"

__all__ = ["MedusaRuntime", "GenerationConfig", "GenerationResult", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import medusa_export.runtime` stays cheap (the CLI's --help must be fast).
    if name == "MedusaRuntime":
        from .api import MedusaRuntime

        return MedusaRuntime
    if name == "GenerationConfig":
        from .generation_config import GenerationConfig

        return GenerationConfig
    if name == "GenerationResult":
        from .generator import GenerationResult

        return GenerationResult
    raise AttributeError(name)
