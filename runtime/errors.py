"""Typed exceptions. Every message is one line that names the problem and the fix."""

from __future__ import annotations


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of another library's exception text, at most ``limit`` characters (its type's name when the
    text is blank): what a one-line message quotes of it."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


class MedusaExportError(Exception):
    """Base class: the CLI prints these as one line and exits with code 2."""


class TreeError(MedusaExportError, ValueError):
    """A `medusa_choices` tree is malformed or does not fit the heads / graph."""


class HeadsError(MedusaExportError, ValueError):
    """A Medusa heads checkpoint is missing, malformed, or does not match the base model."""


class ModelError(MedusaExportError, ValueError):
    """The base model cannot be loaded or is of an unsupported architecture."""


class ArtifactError(MedusaExportError, ValueError):
    """An artifact directory is missing files, corrupt, or from another version."""


class InputError(MedusaExportError, ValueError):
    """A request or data file is invalid (prompt too long, malformed JSONL, bad option)."""


class BackendUnavailableError(MedusaExportError, RuntimeError):
    """A backend's libraries or device are missing; the message says what to install."""


class ExportValidationError(MedusaExportError, RuntimeError):
    """The exported graph disagrees with PyTorch beyond tolerance."""


class BusyError(MedusaExportError, RuntimeError):
    """A shared resource stayed busy past its wait (e.g. every chat template worker): retry (serve answers 503)."""


class EngineError(MedusaExportError, RuntimeError):
    """A TensorRT engine or the CUDA runtime failed while running (out of memory, a rejected shape, a device error)."""


class CheckpointError(MedusaExportError, RuntimeError):
    """A training checkpoint cannot be read (corrupt or foreign): the message names the file and `--no-resume`."""


class TrainingError(MedusaExportError, RuntimeError):
    """A training run went wrong in a way its inputs did not cause (e.g. distributed ranks out of step)."""


def as_exception(error: BaseException) -> Exception:
    """What a request ends with: ``error``, or an EngineError for a BaseException that is not an Exception (a native
    library's panic), which a consumer's ``except Exception`` would miss and a sink would take for an event."""
    if isinstance(error, Exception):
        return error
    return EngineError(f"a step failed inside a native library ({first_line(error, 160) or type(error).__name__}): "
                       f"retry the request; if it recurs, check the artifact with `medusa-export verify`")
