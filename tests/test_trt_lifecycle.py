"""The TensorRT backend's lifecycle on the stand-ins of test_trt_backend.py: engine and CUDA failures become typed
one-line errors, close() frees every device allocation, and an engine tuned on another GPU is a note users see."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
pytest.importorskip("onnx")

from test_trt_backend import _cfg, _copy, fakes, tiny  # noqa: E402,F401 - fixtures shared with that module

from medusa_export.runtime.backends import trt_availability as availability  # noqa: E402
from medusa_export.runtime.backends.trt_availability import Device  # noqa: E402


def _cli_in_process(*args):
    """The CLI in this process, so the stand-ins apply; returns (exit code, stderr)."""
    from typer.testing import CliRunner

    from medusa_export.runtime.cli.app import _register, app

    _register()
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stderr


@pytest.mark.parametrize("fail, message", [("execute", "TensorRT execution failed"),
                                           ("context", "could not create an execution context"),
                                           ("profile", "could not switch the"),
                                           ("address", "TensorRT refused the device address of")])
def test_engine_failures_are_typed_and_one_line_in_the_cli(fakes, tiny, tmp_path, fail, message):
    from medusa_export.engines.cli_entry import build_engines_for_artifact
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.errors import EngineError

    art = _copy(tiny, tmp_path / "art")
    build_engines_for_artifact(art, required=True, log=lambda s: None)
    rt = MedusaRuntime.load(art, backend="trt")
    fakes.record["fail"] = fail
    with pytest.raises(EngineError, match=message):
        rt.generator.generate([5, 6, 7], _cfg(True, 3))
    code, err = _cli_in_process("generate", str(art), "--backend", "trt", "--prompt", "w5 w6", "--no-chat", "--no-medusa")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_sessions_and_backend_close_free_device_memory(fakes, tiny, tmp_path):
    from medusa_export.engines.cli_entry import build_engines_for_artifact
    from medusa_export.runtime.api import MedusaRuntime

    art = _copy(tiny, tmp_path / "art")
    build_engines_for_artifact(art, required=True, log=lambda s: None)
    with MedusaRuntime.load(art, backend="trt") as rt:
        backend = rt.generator.backend
        rt.generator.generate([5, 6, 7], _cfg(True, 4))  # its session went back to the pool when done
        assert len(backend._pool) == 1
        with backend.new_session() as s:
            s.run(np.array([5, 6]), np.arange(2), np.tri(2, dtype=bool), False, 1.0)
            assert not backend._pool  # the pooled resources were reused
        assert len(backend._pool) == 1
        with pytest.raises(ValueError, match="closed"):
            s.run(np.array([5]), np.arange(1), np.ones((1, 1), bool), False, 1.0)
    assert fakes.cuda.live == {}  # every device allocation freed


def test_a_closed_runtime_refuses_requests_and_allocates_nothing(fakes, tiny, tmp_path):
    """As on ONNX Runtime, a typed "closed": a request made a session, which allocated device memory, then failed
    untyped (``max() arg is an empty sequence``)."""
    from medusa_export.engines.cli_entry import build_engines_for_artifact
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.errors import InputError

    art = _copy(tiny, tmp_path / "art")
    build_engines_for_artifact(art, required=True, log=lambda s: None)
    rt = MedusaRuntime.load(art, backend="trt")
    rt.close()
    with pytest.raises(InputError, match="closed"):
        rt.generate([5, 6, 7], max_new_tokens=3, medusa=False)
    assert fakes.cuda.live == {}


def test_engine_tuned_on_another_gpu_is_a_note_the_user_sees(fakes, tiny, tmp_path, monkeypatch):
    from medusa_export.engines.cli_entry import build_engines_for_artifact
    from medusa_export.runtime.api import MedusaRuntime

    art = _copy(tiny, tmp_path / "art")
    build_engines_for_artifact(art, required=True, log=lambda s: None)
    monkeypatch.setattr(availability, "cuda_device", lambda index=0: (Device(index, "Fake H100 NVL", "9.0"), "12.4", ""))
    availability.check.cache_clear()
    assert any("tuned on Fake H100" in n for n in MedusaRuntime.load(art, backend="trt").notes)
    code, err = _cli_in_process("generate", str(art), "--backend", "trt", "--prompt", "w5 w6", "--no-chat",
                                "--max-new-tokens", "3")
    assert code == 0 and "note: engine medusa.plan was tuned on Fake H100" in err, err

