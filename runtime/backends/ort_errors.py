"""ONNX Runtime's failures as this project's one-line typed errors."""

from __future__ import annotations

from ..errors import EngineError


def reason(e: Exception) -> str:
    """ONNX Runtime's message without its status prefix, cut at a length that keeps the cause (it comes last)."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if text.startswith("[ONNXRuntimeError] : "):
        text = text.split(" : ", 3)[-1]
    return text if len(text) <= 300 else text[:140] + " ... " + text[-150:]


def run_bound(session, binding, what: str) -> None:
    """``session.run_with_iobinding(binding)``; a failure (a damaged artifact, an input out of range) is an
    EngineError naming ``what`` ran and how to check the artifact."""
    try:
        session.run_with_iobinding(binding)
    except Exception as e:  # onnxruntime raises its own exception types
        raise EngineError(f"ONNX Runtime failed running the {what} ({reason(e)}): if the artifact may be damaged, "
                          f"`medusa-export verify ARTIFACT` checks it") from None
