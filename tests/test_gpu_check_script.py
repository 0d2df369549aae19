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


def test_without_tensorrt_the_tensorrt_steps_are_skipped(tmp_path):
    """A `python` first on PATH that answers the prerequisites step as a PyTorch-only GPU machine would (exit 3)
    and hands every other call to this interpreter: no TensorRT step runs, the summary says so."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").write_text(
        "#!/usr/bin/env bash\n"
        'if [[ "$1" == - && "$2" == */environment.json ]]; then\n'
        "  cat >/dev/null; echo '{\"ok\": false}' > \"$2\"; echo 'skipping the TensorRT steps: stand-in' >&2; exit 3\n"
        "fi\n"
        f'exec "{sys.executable}" "$@"\n')
    (shim / "python").chmod(0o755)
    (shim / "medusa-export").write_text("#!/usr/bin/env bash\necho called >> \"$(dirname \"$0\")/medusa-export.calls\"\n")
    (shim / "medusa-export").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "TORCH_CHECK": "0"}
    done = run(tmp_path / "r", env)
    assert done.returncode == 0, done.stderr
    assert "skipping the TensorRT steps" in done.stderr
    assert not (shim / "medusa-export.calls").exists()  # no build, verify or bench
    assert json.loads((tmp_path / "r" / "summary.json").read_text()) == {"tensorrt": False, "ok": True}
