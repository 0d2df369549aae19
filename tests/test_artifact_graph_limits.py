"""A manifest is checked against what its graphs were built for, read from the graphs' own tables without their
weights: positions (a fused graph's rotary tables hold max_seq + 1 rows) and tokens (the embedding's rows). An edited
max_seq or vocab_size is refused when the artifact loads, not when decoding reaches the position or the token. Also:
one plain name per file, and trees the manifest holds are trees the runtime builds."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from test_cli import assert_one_line_error, cli  # noqa: E402

from medusa_export.runtime.api import MedusaRuntime  # noqa: E402
from medusa_export.runtime.artifact_files import check_graph_tables, graph_initializer_dims  # noqa: E402
from medusa_export.runtime.errors import ArtifactError  # noqa: E402
from medusa_export.runtime.manifest import Manifest, file_record  # noqa: E402


@pytest.fixture
def art(artifact, tmp_path) -> Path:
    return shutil.copytree(artifact, tmp_path / "art")


def _edit_manifest(art: Path, edit) -> dict:
    data = json.loads((art / "manifest.json").read_text())
    edit(data)
    (art / "manifest.json").write_text(json.dumps(data))
    return data


def _relist(art: Path, name: str) -> None:
    rec = file_record(art / name)
    _edit_manifest(art, lambda m: m["files"].__setitem__(name, {"sha256": rec.sha256, "bytes": rec.bytes}))


def _generate(art: Path):
    return cli("generate", str(art), "-p", "t1 t2", "--max-new-tokens", "2")


def test_the_tables_of_a_built_fused_graph_are_its_limits(artifact):
    manifest = Manifest.read(artifact)
    for graph in manifest.graphs.values():
        dims = graph_initializer_dims(artifact / graph.file, {"cos_cache", "sin_cache", "embed_tokens"})
        assert dims["cos_cache"][0][0] == dims["sin_cache"][0][0] == manifest.max_seq + 1
        assert dims["embed_tokens"][0][0] == manifest.dims.vocab_size


def test_a_max_seq_past_the_graphs_is_refused_at_load(art):
    data = _edit_manifest(art, lambda m: m.__setitem__("max_seq", m["max_seq"] + 1))
    words = [f"built for {data['max_seq'] - 1} positions", f"max_seq {data['max_seq']}", "--max-seq"]
    with pytest.raises(ArtifactError, match=f"built for {data['max_seq'] - 1} positions"):
        MedusaRuntime.load(art)
    assert_one_line_error(_generate(art), *words)


def test_a_max_seq_below_the_graphs_still_loads(art):
    _edit_manifest(art, lambda m: m.__setitem__("max_seq", 64))
    with MedusaRuntime.load(art) as rt:
        assert rt.manifest.max_seq == 64 and rt.generate([5, 6, 7], max_new_tokens=2).new_tokens == 2


def test_a_vocabulary_past_the_graphs_is_refused_at_load(art):
    def grow(m: dict) -> None:
        m["dims"]["vocab_size"] += 16
        m["model"]["vocab_size"] += 16
    data = _edit_manifest(art, grow)
    with pytest.raises(ArtifactError, match=f"embeds {data['dims']['vocab_size'] - 16} tokens but the manifest"):
        MedusaRuntime.load(art)
    assert_one_line_error(_generate(art), "a vocabulary of", "rebuild the artifact")


def _rename_initializer(art: Path, graph_file: str, old: str, new: str) -> None:
    model = onnx.load(str(art / graph_file), load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.name == old:
            tensor.name = new
    (art / graph_file).write_bytes(model.SerializeToString())
    _relist(art, graph_file)


def test_a_fused_graph_without_its_rotary_table_is_refused(art):
    _rename_initializer(art, "vanilla.onnx", "sin_cache", "sin_table")
    with pytest.raises(ArtifactError, match="vanilla.onnx has no 2-D rotary table 'sin_cache'"):
        Manifest.read(art)


def test_a_repeated_rotary_table_counts_its_smallest(art, tmp_path):
    """Two initializers of one name: whichever ONNX Runtime takes, the positions checked are those both hold."""
    model = onnx.load(str(art / "medusa.onnx"), load_external_data=False)
    table = next(t for t in model.graph.initializer if t.name == "cos_cache")
    short = onnx.TensorProto()
    short.CopyFrom(table)
    short.dims[0] = 17
    model.graph.initializer.append(short)
    (art / "medusa.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(ArtifactError, match="built for 16 positions"):
        check_graph_tables(art / "medusa.onnx", 128, 320, fused=True)


@pytest.mark.parametrize("content", [b"", b"\x3a\x05ab"])
def test_an_empty_or_malformed_graph_is_an_artifact_error(art, content):
    (art / "lanes.onnx").write_bytes(content)
    _relist(art, "lanes.onnx")
    with pytest.raises(ArtifactError, match="lanes.onnx"):
        Manifest.read(art)


def test_a_graph_that_is_a_fifo_is_refused_without_hanging(art, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ArtifactError, match="not a regular file"):
        graph_initializer_dims(fifo, {"cos_cache"})


def test_portable_graphs_are_checked_for_their_vocabulary_only(portable_artifact, tmp_path):
    """Their rotary embedding is computed, not a table (no position limit to read); their embedding is one."""
    art = shutil.copytree(portable_artifact, tmp_path / "portable")
    manifest = Manifest.read(art)
    dims = graph_initializer_dims(art / manifest.graphs["vanilla"].file, {"backbone.embed_tokens.weight"})
    assert dims["backbone.embed_tokens.weight"][0][0] == manifest.dims.vocab_size
    _edit_manifest(art, lambda m: m.__setitem__("max_seq", m["max_seq"] * 2))
    assert Manifest.read(art).max_seq == manifest.max_seq * 2

    def grow(m: dict) -> None:
        m["dims"]["vocab_size"] += 1
        m["model"]["vocab_size"] += 1
    _edit_manifest(art, grow)
    with pytest.raises(ArtifactError, match=f"embeds {manifest.dims.vocab_size} tokens"):
        Manifest.read(art)


# ------------------------------------------------------------------ names in one form; trees the runtime can build
@pytest.mark.parametrize("name", ["./tokenizer.json", "heads//config.json", "heads/./config.json", "heads/",
                                  "heads\\config.json", "."])
def test_a_second_name_for_a_file_is_refused(art, name):
    """Keys of ``files`` are what the checks go by: "./tokenizer.json" listed a file under a name no check keyed by
    "tokenizer.json" sees."""
    def alias(m: dict) -> None:
        m["files"][name] = m["files"]["tokenizer.json"]
    _edit_manifest(art, alias)
    with pytest.raises(ArtifactError, match="a path not in its plain form"):
        Manifest.read(art)
    assert_one_line_error(_generate(art), "not a file name a build writes")


def test_a_dotted_file_name_that_is_plain_is_still_read(art):
    from medusa_export.runtime.artifact_files import artifact_file, plain_name

    assert all(map(plain_name, ["a", "heads/config.json", ".hidden", "x..y", "..."]))
    assert artifact_file(art, "heads/config.json") == art / "heads" / "config.json"


def test_a_manifest_tree_larger_than_the_runtime_builds_is_the_manifest_s_error(art):
    """It passed the manifest's bound (4,096 nodes) and failed later as "the tree given ...: give a smaller tree", a
    fix the artifact's user cannot apply."""
    from medusa_export.runtime.tree import MAX_TREE_NODES

    def big(m: dict) -> None:
        m["tree"]["medusa_choices"] = [[0]] + [[0, i % 10] for i in range(MAX_TREE_NODES)]
        m["tree"]["num_nodes"] = MAX_TREE_NODES + 2
    _edit_manifest(art, big)
    with pytest.raises(ArtifactError, match=f"field tree.num_nodes must be at most {MAX_TREE_NODES + 1}"):
        Manifest.read(art)
    assert_one_line_error(_generate(art), "tree.num_nodes", "rebuild the artifact")


def test_a_tree_of_the_root_alone_in_an_artifact_with_heads_is_refused(art):
    """It loaded and "speculated" with no guess of the heads at all, reported as Medusa decoding."""
    def rootless(m: dict) -> None:
        m["tree"]["medusa_choices"] = []
        m["tree"]["num_nodes"] = 1
    _edit_manifest(art, rootless)
    with pytest.raises(ArtifactError, match="field tree.medusa_choices must hold at least one path"):
        MedusaRuntime.load(art)


@pytest.mark.parametrize("edit, words", [
    (lambda g: g.__setitem__("lanes", g["lanes"] + 1), "lacks the input"),  # a graph built for other lanes
    (lambda g: g.__setitem__("file", "medusa.onnx"), "has an unexpected input"),  # another graph
])
def test_a_lanes_graph_that_is_not_the_manifests_is_refused_at_load(art, edit, words):
    """The lanes graph opens at the first batched step: `generate` ran, and `bench --concurrency 2` failed after its
    single-stream rows. Its I/O names are read from the file at load."""
    _edit_manifest(art, lambda m: edit(m["graphs"]["lanes"]))
    with pytest.raises(ArtifactError, match=f"{words} .*rebuild the artifact"):
        MedusaRuntime.load(art)
    assert_one_line_error(_generate(art), words)
