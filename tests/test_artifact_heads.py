"""The PyTorch reference reads an artifact's heads only from the two files build writes and the manifest lists:
nothing dropped into the heads folder, no folder or file leading out of the artifact, no pickle, and a malformed
config.json is a one-line typed error before anything is allocated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from medusa_export.runtime.api import MedusaRuntime  # noqa: E402
from medusa_export.runtime.errors import ArtifactError, HeadsError  # noqa: E402
from medusa_export.runtime.manifest import file_record  # noqa: E402


@pytest.fixture
def art(artifact, tmp_path) -> Path:
    return shutil.copytree(artifact, tmp_path / "art")


def _manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())


def _relist(art: Path, *names: str, directory: str | None = None) -> None:
    """Record ``names`` with their current size and sha256 (as one who can edit the artifact could), and
    optionally point the manifest's heads directory elsewhere."""
    data = _manifest(art)
    for name in names:
        rec = file_record(art / name)
        data["files"][name] = {"sha256": rec.sha256, "bytes": rec.bytes}
    if directory is not None:
        data["heads"]["directory"] = directory
    (art / "manifest.json").write_text(json.dumps(data))


def _load(art: Path, tiny_dirs):
    return MedusaRuntime.load(art, backend="torch", model=str(tiny_dirs[0]))


def test_the_artifact_heads_load(art, tiny_dirs):
    assert _load(art, tiny_dirs).generator.backend.name == "torch"


def test_a_pickle_dropped_into_the_heads_folder_is_refused(art, tiny_dirs):
    torch.save({}, art / "heads" / "medusa_lm_head.pt")
    with pytest.raises(ArtifactError, match="medusa_lm_head.pt is in the artifact but manifest.json does not list"):
        _load(art, tiny_dirs)


def test_a_heads_folder_of_reference_files_symlinked_out_is_refused(art, tiny_dirs, tmp_path):
    """The manifest pointed at a folder holding a reference-layout checkpoint that links out of the artifact."""
    outside = tmp_path / "outside.safetensors"
    shutil.copy(art / "heads" / "heads.safetensors", outside)
    (art / "hx").mkdir()
    (art / "hx" / "config.json").write_text(json.dumps({"medusa_num_heads": 3, "medusa_num_layers": 1}))
    (art / "hx" / "medusa_lm_head.safetensors").symlink_to(outside)
    _relist(art, "hx/config.json", directory="hx")
    with pytest.raises(ArtifactError, match="hx/heads.safetensors is not listed"):
        _load(art, tiny_dirs)


def test_a_reference_format_config_is_refused(art, tiny_dirs):
    (art / "heads" / "config.json").write_text(json.dumps({"medusa_num_heads": 3, "medusa_num_layers": 1}))
    _relist(art, "heads/config.json")
    with pytest.raises(ArtifactError, match="is not medusa-export heads"):
        _load(art, tiny_dirs)


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.pop("num_layers"), "lacks the field 'num_layers'"),
    (lambda c: c.update(num_heads="3"), "num_heads must be an integer"),
    (lambda c: c.update(num_layers=10**7), "num_layers must be an integer in 1..16"),
    (lambda c: c.update(num_heads=True), "num_heads must be an integer"),
    (lambda c: c.update(layout=["own"]), "layout"),
    (lambda c: c.update(draft_vocab_size=-1), "draft_vocab_size must be an integer"),
])
def test_a_malformed_heads_config_is_a_heads_error(art, tiny_dirs, edit, words):
    path = art / "heads" / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    _relist(art, "heads/config.json")
    with pytest.raises(HeadsError, match=words):
        _load(art, tiny_dirs)


@pytest.mark.parametrize("content", [b"\xff\xfe{}", b"[1, 2]", b"[" * 100_000])
def test_a_heads_config_that_is_not_a_json_object_is_a_heads_error(art, tiny_dirs, content):
    (art / "heads" / "config.json").write_bytes(content)
    _relist(art, "heads/config.json")
    with pytest.raises(HeadsError, match="config.json"):
        _load(art, tiny_dirs)


@pytest.mark.parametrize("field, value", [("num_heads", 2), ("num_layers", 2), ("layout", "own")])
def test_heads_that_differ_from_the_graphs_are_named_as_replaced(art, tiny_dirs, field, value):
    """Heads whose config (and tensors) describe other heads than the graphs were built with: named as such, not
    as "the tree does not fit the backend's heads" or missing tensors."""
    path = art / "heads" / "config.json"
    config = json.loads(path.read_text())
    assert config[field] != value
    path.write_text(json.dumps({**config, field: value}))
    _relist(art, "heads/config.json")
    with pytest.raises(ArtifactError, match="but the manifest's graphs were built with .*the heads were replaced"):
        _load(art, tiny_dirs)


@pytest.mark.parametrize("change, words", [
    (lambda state, k: state.update({k: torch.cat([state[k], state[k]])}), "has shape"),
    (lambda state, k: state.pop(k), "lack tensor"),
    (lambda state, k: state.update({k + ".extra": state[k].clone()}), "unexpected tensor"),
])
def test_heads_tensors_that_do_not_fit_their_config_name_a_fix(art, tiny_dirs, change, words):
    """The three errors named the problem only, with no way out."""
    from safetensors.torch import load_file, save_file

    path = art / "heads" / "heads.safetensors"
    state = load_file(path)
    change(state, sorted(state)[0])
    save_file(state, path)
    _relist(art, "heads/heads.safetensors")
    with pytest.raises(HeadsError, match=f"{words} .*: train heads for this model .*or rebuild the artifact"):
        _load(art, tiny_dirs)
