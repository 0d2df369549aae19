"""Optional dependencies: a command that needs one says so in one line before it starts.

    require("build", "export")        # BackendUnavailableError: "build needs torch, which is not installed: ..."
    if available("torch"): ...        # optional extras (e.g. bench's transformers baseline)

The runtime itself needs only numpy, tokenizers and onnxruntime; torch, transformers and onnx come with the
``torch`` / ``export`` / ``train`` extras. Checking by importing (not by looking the package up) also catches
an installed but broken package.
"""

from __future__ import annotations

import importlib

from .errors import BackendUnavailableError

# extra -> the modules it brings that commands check for
EXTRAS = {
    "torch": ("torch", "transformers"),
    "train": ("torch", "transformers"),
    "export": ("torch", "transformers", "onnx", "polygraphy", "onnx_graphsurgeon"),
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
    "ray": ("ray",),
}


def missing(*modules: str) -> str | None:
    """The first of ``modules`` that cannot be imported, or None."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None


def available(*modules: str) -> bool:
    return missing(*modules) is None


def require(what: str, extra: str) -> None:
    """BackendUnavailableError naming the missing module and the extra to install, before any work starts."""
    name = missing(*EXTRAS[extra])
    if name is not None:
        raise BackendUnavailableError(f"{what} needs {name}, which is not installed: "
                                      f"pip install 'medusa-export[{extra}]'")
