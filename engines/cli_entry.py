"""What `medusa-export build --engine trt|all` calls after the ONNX artifact is written, and a small CLI that
(re)builds only the engines of an existing artifact:

    python -m medusa_export.engines artifacts/gpu [--workspace-gib 8] [--max-prompt 1024] [--allow-tf32]

``required=True`` (``--engine trt``): no TensorRT or no GPU raises BackendUnavailableError (the CLI prints
one line and exits 2). ``required=False`` (``--engine all``): logs "skipping TensorRT engines: <reason>"
and returns; the ONNX artifact stays complete and valid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from medusa_export.runtime.errors import BackendUnavailableError, MedusaExportError

from medusa_export.runtime.backends import trt_availability as availability


def preflight(engine: str) -> None:
    """Call before the (long) ONNX export: ``--engine trt`` fails at once when TensorRT cannot be used."""
    if engine == "trt":
        availability.require()


def build_engines_for_artifact(directory: str | Path, required: bool, log: Callable[[str], None] = print,
                               **options) -> dict | None:
    """Build the TensorRT engines of the artifact in ``directory``; returns the updated manifest, or None when
    skipped. ``options`` are `BuildOptions` fields (workspace_gib, max_prompt, allow_tf32, ...)."""
    status = availability.check()
    if not status.ok:
        if required:
            raise BackendUnavailableError(status.reason)
        log(f"skipping TensorRT engines: {status.reason}")
        return None
    from .builder import BuildOptions, build_engines

    log(f"TensorRT {status.tensorrt_version} on {status.device.name} ({status.device.sm}, CUDA runtime {status.cuda_runtime})")
    return build_engines(directory, BuildOptions(**options), log=log)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m medusa_export.engines",
                                description="Build (or rebuild) the TensorRT engines of a medusa-export artifact.")
    p.add_argument("artifact", type=Path, help="artifact directory (from `medusa-export build`)")
    p.add_argument("--workspace-gib", type=float, default=None, help="builder workspace limit in GiB")
    p.add_argument("--max-prompt", type=int, default=None, help="largest prefill chunk (default max_seq // 2)")
    p.add_argument("--opt-prompt", type=int, default=None, help="prefill length to tune for (default 128)")
    p.add_argument("--opt-past", type=int, default=None, help="context length to tune steps for (default 256)")
    p.add_argument("--allow-tf32", action="store_true", help="fp32 graphs: allow TF32 matmuls")
    p.add_argument("--weakly-typed", action="store_true", help="TensorRT 10: weak typing + BuilderFlag.FP16/BF16")
    p.add_argument("--optimization-level", type=int, default=None, help="builder optimization level 0-5")
    p.add_argument("--timing-cache", type=Path, default=None, help="timing cache file (reused across builds)")
    a = p.parse_args(argv)
    try:
        build_engines_for_artifact(a.artifact, required=True, workspace_gib=a.workspace_gib, max_prompt=a.max_prompt,
                                   opt_prompt=a.opt_prompt, opt_past=a.opt_past, allow_tf32=a.allow_tf32,
                                   strongly_typed=not a.weakly_typed, optimization_level=a.optimization_level,
                                   timing_cache=a.timing_cache)
    except MedusaExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
