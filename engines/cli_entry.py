"""What `medusa-export build --engine trt|all` and `medusa-export build-engines ARTIFACT` call: build the TensorRT
engines of an artifact whose ONNX graphs are written (the command's options are `BuildOptions` fields).

``required=True`` (``--engine trt``): no TensorRT or no GPU raises BackendUnavailableError (the CLI prints
one line and exits 2). ``required=False`` (``--engine all``): logs "skipping TensorRT engines: <reason>"
and returns; the ONNX artifact stays complete and valid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from medusa_export.runtime.errors import BackendUnavailableError, MedusaExportError

from medusa_export.runtime.backends import trt_availability as availability
from medusa_export.runtime.backends.trt_compat import require_portable
from medusa_export.runtime.manifest import Manifest


def preflight(engine: str) -> None:
    """Call before the (long) ONNX export: ``--engine trt`` fails at once when TensorRT cannot be used."""
    if engine == "trt":
        availability.require()


def build_engines_for_artifact(directory: str | Path, required: bool, log: Callable[[str], None] = print,
                               **options) -> Manifest | None:
    """Build the TensorRT engines of the artifact in ``directory``; returns the updated manifest, or None when
    skipped. ``options`` are `BuildOptions` fields (workspace_gib, max_prompt, allow_tf32, ...)."""
    from .builder import BuildOptions, build_engines
    from .profiles import engine_profiles

    build_options = BuildOptions(**options)  # the artifact and the options first: they are wrong on any machine
    manifest = Manifest.read(directory)
    require_portable(manifest, Path(directory))
    try:
        for kind in manifest.graphs:
            engine_profiles(manifest, kind, build_options.max_prompt)
        status = availability.check()
        if not status.ok:
            raise BackendUnavailableError(status.reason)
    except MedusaExportError as e:  # with --engine all the ONNX artifact stands without engines
        if required:
            raise
        log(f"skipping TensorRT engines: {e}")
        return None
    log(f"TensorRT {status.tensorrt_version} on {status.device.name} ({status.device.sm}, CUDA runtime {status.cuda_runtime})")
    return build_engines(directory, build_options, log=log)
