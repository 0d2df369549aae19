"""scripts/gpu_check.sh on machines without TensorRT: one line and exit 2 without any GPU; with a CUDA device for
PyTorch but no TensorRT, the TensorRT steps are skipped with the reason and the rest runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def run(results: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(results)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_no_tensorrt_and_no_cuda_is_exit_2_with_one_line(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = run(tmp_path / "r", {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no CUDA device" in errors[0]
    assert json.loads((tmp_path / "r" / "environment.json").read_text())["ok"] is False
    assert not (tmp_path / "r" / "summary.json").exists()


def _pytorch_only_gpu(tmp_path: Path, **extra: str) -> tuple[dict, Path]:
    """The environment of a GPU image without TensorRT: PyTorch reports a CUDA device (a sitecustomize stand-in
    patches torch.cuda), and a `medusa-export` first on PATH records any call (the TensorRT steps use it)."""
    site, shim = tmp_path / "site", tmp_path / "bin"
    site.mkdir()
    shim.mkdir()
    (site / "sitecustomize.py").write_text(
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "torch.cuda.get_device_name = lambda *args: 'Stand-in GPU'\n")
    (shim / "medusa-export").write_text(f"#!/usr/bin/env bash\necho \"$*\" >> {shim / 'calls'}\n")
    (shim / "medusa-export").chmod(0o755)
    path = f"{shim}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "PYTHONPATH": str(site), **extra}, shim / "calls"


def test_without_tensorrt_the_tensorrt_steps_are_skipped(tmp_path):
    pytest.importorskip("torch")
    env, calls = _pytorch_only_gpu(tmp_path, TORCH_CHECK="0")
    done = run(tmp_path / "r", env)
    assert done.returncode == 0, done.stderr
    assert "skipping the TensorRT steps: TensorRT is not installed" in done.stderr
    assert not calls.exists()  # no build, verify or bench
    assert json.loads((tmp_path / "r" / "environment.json").read_text())["torch_cuda_device"] == "Stand-in GPU"
    assert json.loads((tmp_path / "r" / "summary.json").read_text()) == {"tensorrt": False, "ok": True}


def test_the_pytorch_check_runs_by_default_where_pytorch_sees_cuda(tmp_path):
    """TORCH_CHECK unset: the check runs (and fails here, where the CUDA device is a stand-in): exit 1."""
    pytest.importorskip("torch")
    env, calls = _pytorch_only_gpu(tmp_path)
    env.pop("TORCH_CHECK", None)
    done = run(tmp_path / "r", env)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert done.returncode == 1 and summary["tensorrt"] is False and summary["ok"] is False
    assert summary["torch_cuda"] != 0 and not calls.exists()
