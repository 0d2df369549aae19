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


TORCH_CHECK = REPO / "scripts" / "torch_cuda_check.py"


def test_torch_cuda_check_without_cuda_is_exit_2_with_one_line():
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run([sys.executable, str(TORCH_CHECK), "--limit", "1"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "no CUDA device" in done.stderr


def test_torch_cuda_check_verifies_the_whole_tree_on_every_step(tmp_path, monkeypatch, capsys, tiny_dirs,
                                                                tiny_prompts_file):
    """Left to the runtime, a greedy Medusa request may run the vanilla graph, or the root alone at each step: the
    check compared vanilla with vanilla and timed no tree (measured: cpu_small_10 accepted 1.0 tokens per step)."""
    import medusa_export.exporter.model_loading as ml
    from medusa_export.exporter.torch_backend import TorchSession

    model_dir, heads_dir = tiny_dirs
    loaded = ml.load_base_model(model_dir)
    monkeypatch.setattr(ml, "load_base_model", lambda source=None: loaded)
    rows: list[int] = []
    run = TorchSession.run
    monkeypatch.setattr(TorchSession, "run", lambda self, ids, *a, **k: rows.append(len(ids)) or run(self, ids, *a, **k))
    script = _fresh_script(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["x", "--device", "cpu", "--heads", str(heads_dir), "--trees", "chain-2",
                                      "--prompts", str(tiny_prompts_file), "--limit", "3", "--max-new-tokens", "12"])
    assert script.main() == 0
    report = json.loads(capsys.readouterr().out)
    tree = report["trees"]["chain-2"]
    assert tree["identical_to_vanilla"] == "3/3" and tree["divergence_top2_gap"] == [None] * 3
    medusa_rows = rows[-(tree["steps"] + 3):]  # the last prompts' steps and prefills
    assert sorted(set(medusa_rows))[:1] == [3] and 1 not in medusa_rows  # whole tree (3 nodes) every step


def _fresh_script(monkeypatch):
    """torch_cuda_check executed anew (it reads what the test patched), with scripts/ on the path for its own
    imports (script_io): it passed only where an earlier test had loaded script_io, so alone it failed."""
    import importlib.util

    monkeypatch.syspath_prepend(str(TORCH_CHECK.parent))
    spec = importlib.util.spec_from_file_location("torch_cuda_check", TORCH_CHECK)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_top2_gap_is_the_base_models_margin(tiny, monkeypatch):
    import torch

    script = _fresh_script(monkeypatch)
    ids = [3, 9, 27]
    with torch.inference_mode():
        top = torch.topk(tiny.model(torch.tensor([ids])).logits[0, -1], 2).values
    assert abs(script._top2_gap(tiny.backend(), ids) - float(top[0] - top[1])) < 1e-4
