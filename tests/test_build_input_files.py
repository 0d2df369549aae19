"""The files a model's weight index names: every shard a relative path inside the model directory (subfolders
allowed) and a regular file, checked before anything opens it, and counted by the check of layers against weights
(found by attacking it: shards in a subfolder skipped both, so a FIFO there hung the build and a config of more
layers than the weights hold loaded with random layers until the load's own check)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytest.importorskip("torch")
pytest.importorskip("safetensors")

from medusa_export.exporter.model_loading import load_base_model  # noqa: E402
from medusa_export.runtime.errors import ModelError  # noqa: E402

INDEX = "model.safetensors.index.json"


def _sharded_copy(tiny_dirs, tmp_path, shard: str = "sub/model.safetensors", index: str = INDEX):
    """A copy of the tiny model whose weights are ``shard`` (moved there), listed by the weight index ``index``."""
    from safetensors import safe_open

    model_dir = shutil.copytree(tiny_dirs[0], tmp_path / "model")
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    (model_dir / shard).parent.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.safetensors").rename(model_dir / shard)
    (model_dir / index).write_text(json.dumps({"metadata": {}, "weight_map": {k: shard for k in keys}}))
    return model_dir


def test_shards_in_a_subfolder_load_and_count_for_the_layer_check(tiny_dirs, tmp_path):
    model_dir = _sharded_copy(tiny_dirs, tmp_path)
    assert load_base_model(model_dir).model.config.num_hidden_layers == 2
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 3}))
    with pytest.raises(ModelError, match="says num_hidden_layers 3, but the weights hold 2 layers"):
        load_base_model(model_dir)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("index", [INDEX, "pytorch_model.bin.index.json"])
def test_a_fifo_shard_in_a_subfolder_is_refused_not_waited_on(tiny_dirs, tmp_path, index):
    model_dir = _sharded_copy(tiny_dirs, tmp_path, index=index)
    (model_dir / "sub" / "model.safetensors").unlink()
    os.mkfifo(model_dir / "sub" / "model.safetensors")
    with pytest.raises(ModelError, match=f"sub/model.safetensors, a shard {index} lists, is missing or not a "
                                         f"regular file"):
        load_base_model(model_dir)


def test_a_missing_shard_is_named(tiny_dirs, tmp_path):
    model_dir = _sharded_copy(tiny_dirs, tmp_path)
    shutil.rmtree(model_dir / "sub")
    with pytest.raises(ModelError, match="sub/model.safetensors, a shard .* is missing"):
        load_base_model(model_dir)
    (model_dir / INDEX).write_text(json.dumps({"weight_map": {"model.norm.weight": "x" * 300}}))
    with pytest.raises(ModelError, match="a shard .* is missing"):  # the system's "name too long" was a traceback
        load_base_model(model_dir)


@pytest.mark.parametrize("name", ["../elsewhere.safetensors", "/tmp/elsewhere.safetensors", "sub/../../x",
                                  "C:\\x.safetensors", "", "a\nb", 5])
def test_a_shard_named_outside_the_model_directory_is_refused_before_it_is_read(tiny_dirs, tmp_path, name):
    """transformers joins the name to the directory: an absolute one or one with ".." read any file."""
    model_dir = _sharded_copy(tiny_dirs, tmp_path, shard="model.safetensors")
    (model_dir / INDEX).write_text(json.dumps({"weight_map": {"model.norm.weight": name}}))
    with pytest.raises(ModelError, match=f"{INDEX} names the shard .*, which is not a path inside"):
        load_base_model(model_dir)


def test_a_shard_through_a_symlink_is_followed_as_the_models_own_files_are(tiny_dirs, tmp_path):
    """A Hugging Face cache links every file of a snapshot into its blobs folder: a link is followed, and only what
    it leads to must be a regular file."""
    model_dir = _sharded_copy(tiny_dirs, tmp_path)
    blob = tmp_path / "blobs" / "abc"
    blob.parent.mkdir()
    (model_dir / "sub" / "model.safetensors").rename(blob)
    (model_dir / "sub" / "model.safetensors").symlink_to(blob)
    assert load_base_model(model_dir).model.config.num_hidden_layers == 2
    blob.unlink()
    with pytest.raises(ModelError, match="is missing or not a regular file"):
        load_base_model(model_dir)


def test_the_models_identity_follows_the_shards_in_a_subfolder(tiny_dirs, tmp_path):
    """The manifest's model sha256_16 covers a subfolder shard: other weights there are another model."""
    from medusa_export.exporter.model_loading import _dir_fingerprint

    model_dir = _sharded_copy(tiny_dirs, tmp_path)
    before = _dir_fingerprint(model_dir)
    shard = model_dir / "sub" / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # one weight's last byte
    shard.write_bytes(bytes(data))
    assert _dir_fingerprint(model_dir) != before
