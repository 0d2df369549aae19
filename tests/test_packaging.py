"""The wheel carries every file the package reads: a `pip install medusa-export` (not editable) builds and runs.

The source tree's package folders hold data beside the code (the built-in model's heads and trees, the packaged
prompts, the kernels' C sources); each is found through ``Path(__file__)``, so a file the wheel leaves out breaks
only an installed copy. The wheel is built from a copy of the sources, so the checkout is left as it was.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"runtime": "medusa_export/runtime", "exporter": "medusa_export/exporter", "engines": "medusa_export/engines"}
NOT_SHIPPED = {".pyc", ".so", ".o"}  # build outputs a run may leave in the tree


def _source_files() -> set[str]:
    """Every file of the package folders, as its path inside the installed package."""
    found = set()
    for folder, installed in PACKAGES.items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in NOT_SHIPPED:
                found.add(f"{installed}/{path.relative_to(ROOT / folder).as_posix()}")
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    pytest.importorskip("setuptools", minversion="77", reason="building the wheel needs setuptools >= 77 (the set-up "
                        "installs it)")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in PACKAGES:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    out = tmp_path_factory.mktemp("wheel")
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    (path,) = out.glob("medusa_export-*.whl")
    with zipfile.ZipFile(path) as zf:
        yield zf


def test_wheel_holds_every_file_of_the_package_folders(wheel):
    missing = sorted(_source_files() - set(wheel.namelist()))
    assert not missing, f"the wheel leaves out {len(missing)} files, e.g. {missing[:5]}: add them to package-data"


def test_wheel_holds_the_built_in_models_heads(wheel):
    # `build` with no --heads reads these from the installed package: named apart so a failure says what breaks.
    from medusa_export.exporter.heads_source import SHIPPED_HEADS_DIR

    inside = SHIPPED_HEADS_DIR.relative_to(ROOT / "exporter").as_posix()
    for name in ("heads.safetensors", "config.json", "tree.json", "draft_vocab.json"):
        assert f"medusa_export/exporter/{inside}/{name}" in wheel.namelist(), name


def test_wheel_installs_the_command(wheel):
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(wheel.read(entry_points).decode())
    target = parser["console_scripts"]["medusa-export"]
    module, func = target.split(":")
    assert f"{module.replace('.', '/')}.py" in wheel.namelist()
    assert func == "main"
