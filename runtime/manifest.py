"""The artifact manifest: a versioned JSON that tells the runtime everything about an artifact directory.

    manifest = read_manifest("artifacts/smollm2")     # checks format, version, paths and file sizes
    manifest = read_manifest(d, check_hashes=True)    # ... and every file's sha256 (what `verify` does)
    dims = manifest_dims(manifest)
    path = artifact_file(d, manifest["graphs"]["medusa"]["file"])   # a path inside the artifact, or ArtifactError

Every file the manifest names is relative to the artifact directory and must stay inside it: absolute
names, ``..`` and symlinks that lead out are refused before anything is opened.

Layout of an artifact directory::

    manifest.json        this file (written last: a directory without it is not an artifact)
    medusa.onnx          backbone + fused heads;  vanilla.onnx  backbone only (the honest baseline)
    tokenizer.json, tokenizer_config.json, generation_config.json
    heads/               the heads' safetensors + config (for the PyTorch reference / rebuilds)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath, PureWindowsPath

from . import io_table
from .backends.base import ModelDims
from .errors import ArtifactError

FORMAT = "medusa-export-artifact"
FORMAT_VERSION = 2  # 2: kv_layout / graph_format name the graphs' kind (version 1 artifacts: portable graphs)
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
PORTABLE, ONNXRUNTIME = "portable", "onnxruntime"  # graph formats: standard ops (ORT + TensorRT) / fused (ORT only)
WEIGHTS = ("fp32", "fp16", "int8", "int4")  # manifest["weights"] (`build --dtype`)
QUANTIZED_WEIGHTS = ("int8", "int4")  # MatMulNBits weights: fp32 activations and KV cache, ONNX Runtime only


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_manifest(directory: Path, manifest: dict) -> Path:
    out = directory / MANIFEST
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out)
    return out


def artifact_file(directory: str | Path, name: object) -> Path:
    """``directory / name`` for a file the manifest names; ArtifactError unless ``name`` is a relative path
    that stays inside the artifact (no absolute path, no ``..``, no symlink leading out)."""
    directory = Path(directory)
    text = name if isinstance(name, str) else ""
    parts = PurePosixPath(text.replace("\\", "/")).parts
    if (not text or PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute()
            or PureWindowsPath(text).drive or ".." in parts):
        raise ArtifactError(f"{directory / MANIFEST} names the file {name!r}, which is not a path inside the "
                            f"artifact: refusing to read it; rebuild the artifact with `medusa-export build`")
    path = directory / text
    root = directory.resolve()
    if not path.resolve().is_relative_to(root):
        raise ArtifactError(f"artifact file {path} leads outside {directory} (a symlink): refusing to read it; "
                            f"rebuild the artifact with `medusa-export build`")
    return path


def _named_files(manifest: dict) -> list:
    """Every path the manifest names: the file records, graphs, engines and the heads directory."""
    names = list(manifest.get("files", {}))
    names += [g.get("file") for g in manifest.get("graphs", {}).values()]
    names += [e.get(k) for e in (manifest.get("engines") or {}).values() for k in ("file", "onnx") if k in e]
    if manifest.get("heads", {}).get("directory") is not None:
        names.append(manifest["heads"]["directory"])
    return names


def read_manifest(directory: str | Path, check_hashes: bool = False) -> dict:
    """Read and check the manifest: format, version, every named path inside the artifact, every listed
    file present with its recorded size (and its sha256 when ``check_hashes``)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory {directory} does not exist: run `medusa-export build --out {directory}`")
    if not path.exists():
        raise ArtifactError(f"{directory} has no {MANIFEST}: not a complete artifact, rebuild it with `medusa-export build`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is corrupt ({e.msg}, line {e.lineno}): rebuild the artifact") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a medusa-export manifest (format {manifest.get('format')!r}): rebuild the artifact")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{path} has manifest version {version}, this runtime reads version {FORMAT_VERSION}: "
            f"rebuild the artifact with this medusa-export ({manifest.get('package_version', '?')} built it)"
        )
    for name in _named_files(manifest):  # all of them before any file is opened
        artifact_file(directory, name)
    for name, rec in manifest.get("files", {}).items():
        f = directory / name
        if not f.exists():
            raise ArtifactError(f"artifact file {f} is missing: rebuild the artifact")
        if f.stat().st_size != rec["bytes"]:
            raise ArtifactError(f"artifact file {f} has {f.stat().st_size} bytes, the manifest says {rec['bytes']}: "
                                f"it is truncated or replaced, rebuild the artifact")
        if check_hashes and sha256_file(f) != rec["sha256"]:
            raise ArtifactError(f"artifact file {f} does not match its sha256 in the manifest: it is corrupt, rebuild the artifact")
    return manifest


def manifest_dims(manifest: dict) -> ModelDims:
    return ModelDims(**manifest["dims"])


def kv_layout(manifest: dict) -> str:
    """The graphs' KV layout (``io_table.KV_LAYOUTS``); version 1 artifacts are sequence-major."""
    layout = manifest.get("kv_layout", io_table.SEQUENCE_MAJOR)
    return layout if layout in io_table.KV_LAYOUTS else io_table.SEQUENCE_MAJOR


def graph_format(manifest: dict) -> str:
    return manifest.get("graph_format", PORTABLE)


def graph_paths(manifest: dict, kind: str) -> int | None:
    """Root-to-leaf paths a fused graph verifies exactly (runtime/tree_paths.py); None: a masked tree step
    (portable graphs, and fused graphs built before per-path verification)."""
    return manifest["graphs"][kind].get("paths")
