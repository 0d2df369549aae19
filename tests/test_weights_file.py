"""The shared weights file and the graphs opened after load: only listed, unchanged files are read; failures
while running are one-line typed errors."""

from __future__ import annotations

import json
import re
import shutil
import threading

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from medusa_export.runtime.errors import ArtifactError, EngineError  # noqa: E402


def _copy(artifact, tmp_path, name="copy"):
    return shutil.copytree(artifact, tmp_path / name)


def _manifest(art) -> dict:
    return json.loads((art / "manifest.json").read_text())


def _write_manifest(art, m: dict) -> None:
    (art / "manifest.json").write_text(json.dumps(m))


def _read_weights_from(art, location: str, graph: str = "vanilla.onnx") -> dict:
    """Point every external-data entry of ``graph`` at ``location`` and record the graph's new size and hash;
    returns the manifest (written)."""
    import hashlib

    path = art / graph
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(path))
    m = _manifest(art)
    m["files"][graph] = {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    _write_manifest(art, m)
    return m


@pytest.mark.parametrize("which", ["artifact", "portable_artifact"])
def test_the_graphs_share_one_weights_file(which, request):
    """Every initializer of 1 KiB or more lives in weights.bin, each distinct content once (the graphs' shared
    backbone weights are stored once), at 4 KiB aligned offsets; the graph files hold no weights of their own."""
    import hashlib

    import onnx

    artifact = request.getfixturevalue(which)
    m = json.loads((artifact / "manifest.json").read_text())
    assert "weights.bin" in m["files"] and not list(artifact.glob("*.onnx.data"))
    data = (artifact / "weights.bin").read_bytes()
    regions, references, per_graph = {}, 0, {}
    for kind, graph in m["graphs"].items():
        model = onnx.load(str(artifact / graph["file"]), load_external_data=False)
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                assert len(t.raw_data) < 1024, t.name
                continue
            info = {e.key: e.value for e in t.external_data}
            offset, length = int(info["offset"]), int(info["length"])
            assert info["location"] == "weights.bin" and offset % 4096 == 0
            regions.setdefault(hashlib.sha256(data[offset:offset + length]).digest(), set()).add(offset)
            references += 1
            per_graph[kind] = per_graph.get(kind, 0) + length
    assert all(len(offsets) == 1 for offsets in regions.values())  # one copy per distinct content
    assert references > len(regions)  # the graphs share weights
    assert len(data) < 1.5 * per_graph["medusa"] < sum(per_graph.values())  # about one graph's weights, not all


def test_graphs_open_at_their_first_use(artifact):
    """Each open graph holds its own copy of the weights: loading opens the graph a default request runs, the
    vanilla graph opens at the first request without the heads, the lanes graph at the first batched call."""
    from medusa_export.runtime.api import MedusaRuntime

    with MedusaRuntime.load(artifact, backend="ort") as rt:
        backend = rt.generator.backend
        assert list(backend.sessions) == ["medusa"]  # the graph a default request runs; the others at first use
        alone = rt.generate([5, 6, 7], max_new_tokens=4, chat=False).token_ids
        assert backend._lanes is None and "vanilla" not in backend.sessions
        rt.generate([5, 6, 7], max_new_tokens=4, chat=False, medusa=False)
        assert sorted(backend.sessions) == ["medusa", "vanilla"]
        together = rt.generate_many([[5, 6, 7], [8, 9]], max_new_tokens=4, chat=False)
        assert backend._lanes is not None and backend.lanes is backend._lanes
        assert together[0].token_ids == alone


def test_a_weights_file_the_manifest_does_not_list_is_refused(artifact, tmp_path):
    from medusa_export.runtime.api import MedusaRuntime

    art = _copy(artifact, tmp_path)
    m = _manifest(art)
    del m["files"]["weights.bin"]
    _write_manifest(art, m)
    with pytest.raises(ArtifactError, match="reads its weights from 'weights.bin', which the manifest does not list"):
        MedusaRuntime.load(art)


def test_a_graph_naming_another_unlisted_file_is_refused(artifact, tmp_path):
    """A graph edited to read its external data from a file of its own choosing, inside the artifact but not
    listed (so never size- or hash-checked): refused before ONNX Runtime opens it."""
    from medusa_export.runtime.api import MedusaRuntime

    art = _copy(artifact, tmp_path)
    shutil.copy(art / "weights.bin", art / "extra.bin")
    _read_weights_from(art, "extra.bin")
    with pytest.raises(ArtifactError, match="vanilla.onnx reads its weights from 'extra.bin', not a file a build "
                                            "writes"):  # every graph's files are checked at load
        MedusaRuntime.load(art)


@pytest.mark.parametrize("location", ["*/_ORT_MEM_ADDR_/*", "extra.bin"])
def test_a_graph_reading_a_name_no_build_writes_is_refused_even_when_listed(artifact, tmp_path, location):
    """ONNX Runtime before 1.32 read the location "*/_ORT_MEM_ADDR_/*" as "the offset is a memory address" (a
    segfault on 1.22, an arbitrary read with a real address): only weights.bin and GRAPH.data are opened, even when
    the manifest lists the file."""
    from medusa_export.runtime.api import MedusaRuntime

    art = _copy(artifact, tmp_path)
    (art / location).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(art / "weights.bin", art / location)
    m = _read_weights_from(art, location)
    m["files"][location] = dict(m["files"]["weights.bin"])
    _write_manifest(art, m)
    with pytest.raises(ArtifactError, match=f"vanilla.onnx reads its weights from '{re.escape(location)}', not a file "
                                            f"a build writes"):
        MedusaRuntime.load(art)


def test_an_unlisted_file_named_with_the_entry_fields_swapped_is_refused(artifact, tmp_path):
    """The same edit with each external-data entry written value first, key second (legal protobuf, which ONNX
    Runtime reads): the graph is parsed, not searched for one byte order."""
    from medusa_export.runtime.api import MedusaRuntime

    art = _copy(artifact, tmp_path)
    shutil.copy(art / "weights.bin", art / "weightz.bin")
    path = art / "vanilla.onnx"
    entry, swapped = b"\x0a\x08location\x12\x0bweights.bin", b"\x12\x0bweightz.bin\x0a\x08location"
    data = path.read_bytes()
    assert entry in data
    path.write_bytes(data.replace(entry, swapped))  # the same length: no enclosing length changes
    m = _manifest(art)
    m["files"]["vanilla.onnx"]["bytes"] = path.stat().st_size
    _write_manifest(art, m)
    with pytest.raises(ArtifactError, match="vanilla.onnx reads its weights from 'weightz.bin', not a file a build "
                                            "writes"):
        MedusaRuntime.load(art)


def test_a_truncated_graph_is_refused_at_load(artifact, tmp_path):
    """Listed with its new size and hash, so only reading it can tell: its protobuf ends mid-field."""
    import hashlib

    from medusa_export.runtime.api import MedusaRuntime

    art = _copy(artifact, tmp_path)
    path = art / "lanes.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    m = _manifest(art)
    m["files"]["lanes.onnx"] = {"bytes": 1000, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    _write_manifest(art, m)
    with pytest.raises(ArtifactError, match="lanes.onnx is not a well-formed ONNX model"):
        MedusaRuntime.load(art)


def test_an_artifact_replaced_after_load_is_not_read_by_the_lanes_graph(artifact, tmp_path):
    """The lanes graph opens at the first batched step: if the artifact was rebuilt or replaced meanwhile, that step
    refuses (its graph would belong to another build) instead of mixing two artifacts."""
    from medusa_export.runtime.api import MedusaRuntime

    art = _copy(artifact, tmp_path)
    with MedusaRuntime.load(art) as rt:
        alone = rt.generate([5, 6, 7], max_new_tokens=3, chat=False).token_ids
        m = _manifest(art)
        m["package_version"] = m["package_version"] + "+rebuilt"
        _write_manifest(art, m)
        with pytest.raises(ArtifactError, match="changed on disk after it was loaded"):
            rt.generate_many([[5, 6, 7], [8, 9]], max_new_tokens=3, chat=False)
        # The open graph carries on (pinned: the graph choice may try the other, unopened one next, which refuses too)
        rt.generator.spec.heads_for = lambda tree: tree
        assert rt.generate([5, 6, 7], max_new_tokens=3, chat=False).token_ids == alone


def test_a_graph_failing_while_it_runs_is_a_one_line_engine_error(artifact, tmp_path):
    """The Medusa graph's index tables in weights.bin overwritten in place, same size (loading checks sizes, not
    hashes): they point nowhere and ONNX Runtime fails mid-step. The library raises EngineError, the CLI prints
    one line naming `verify`."""
    from medusa_export.runtime.api import MedusaRuntime
    from test_cli import assert_one_line_error, cli

    art = _copy(artifact, tmp_path)
    regions = [{e.key: e.value for e in t.external_data}
               for t in onnx.load(str(art / "medusa.onnx"), load_external_data=False).graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL and t.data_type == onnx.TensorProto.INT64]
    assert regions
    with open(art / "weights.bin", "r+b") as f:
        for r in regions:
            f.seek(int(r["offset"]))
            f.write(b"\x7f" * int(r["length"]))
    with MedusaRuntime.load(art) as rt, pytest.raises(EngineError, match="verify"):
        rt.generate([5, 6, 7], max_new_tokens=3, chat=False)
    proc = cli("generate", str(art), "--prompt", "t5 t6", "--no-chat", "--max-new-tokens", "3")
    assert_one_line_error(proc, "ONNX Runtime failed running", "medusa-export verify")


def test_two_batchers_on_one_runtime_each_get_the_answers_alone(artifact):
    """Two engines share the backend's one lanes graph (two batchers, two generate_many calls on threads): their
    steps take turns on it, and every answer is the answer alone."""
    from medusa_export.runtime.api import MedusaRuntime

    prompts = [[5, 6, 7], [8, 9], [100, 200, 300, 17], [250, 11, 250]]
    with MedusaRuntime.load(artifact) as rt:
        alone = [rt.generate(p, max_new_tokens=8, chat=False).token_ids for p in prompts]
        results, errors = {}, []

        def run(k):
            try:
                results[k] = [r.token_ids for r in rt.generate_many(prompts, max_new_tokens=8, chat=False)]
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors and all(results[k] == alone for k in range(3)), errors


def test_an_engine_of_one_sequence_does_not_open_the_lanes_graph(artifact):
    from medusa_export.runtime.api import MedusaRuntime

    with MedusaRuntime.load(artifact) as rt:
        out = rt.generate_many([[5, 6, 7], [8, 9]], max_num_seqs=1, max_new_tokens=4, chat=False)
        assert rt.generator.backend._lanes is None and len(out) == 2


def test_verify_opens_the_lanes_graph(artifact, tmp_path):
    """Loading leaves the lanes graph for the first batched step; verify opens it, so a damaged lanes graph fails
    verify (one line) rather than the first batched request of a server."""
    from test_cli import assert_one_line_error, cli

    art = _copy(artifact, tmp_path)
    path = art / "lanes.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    m = _manifest(art)
    m["files"]["lanes.onnx"]["bytes"] = path.stat().st_size
    import hashlib

    m["files"]["lanes.onnx"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    _write_manifest(art, m)
    proc = cli("verify", str(art), "--backends", "ort,torch", "--limit", "1", "--max-new-tokens", "2")
    assert_one_line_error(proc, "lanes.onnx", "rebuild the artifact")


def test_the_tensorrt_builder_checks_the_files_a_graph_reads_before_parsing(artifact, tmp_path, monkeypatch):
    """build-engines hands a graph to TensorRT's parser, which opens the files it names: the same check first."""
    import types

    from medusa_export.engines import builder
    from medusa_export.engines.builder import BuildOptions
    from medusa_export.runtime.backends import trt_availability
    from medusa_export.runtime.manifest import Manifest

    art = _copy(artifact, tmp_path)
    _read_weights_from(art, "../outside.bin")
    monkeypatch.setattr(trt_availability, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.0"))
    monkeypatch.setattr(trt_availability, "require", lambda: types.SimpleNamespace(device=None))
    with pytest.raises(ArtifactError, match="reads its weights from '../outside.bin', not a file a build writes"):
        builder.build_engine(art, Manifest.read(art), "vanilla", BuildOptions(), log=lambda _m: None)


@pytest.mark.parametrize("field, grow", [("max_seq", 64), ("vocab_size", 16)])
def test_a_manifest_whose_limits_the_graphs_do_not_take_is_refused_at_load(artifact, tmp_path, field, grow):
    """The manifest holds the files' hashes and is not hashed itself: an edited max_seq or vocab_size loaded, and
    only verify's run of the graphs at those limits found it. Loading now reads the fused graphs' tables (rotary
    rows, embedding rows) and refuses it in one line, before any step."""
    from test_cli import cli

    art = _copy(artifact, tmp_path)
    m = _manifest(art)
    ok = cli("verify", str(art), "--backends", "ort,torch", "--limit", "1", "--max-new-tokens", "2")
    assert ok.returncode == 0 and "at the manifest's limits" in ok.stdout and "-> OK" in ok.stdout.splitlines()[-1]
    if field == "max_seq":
        m["max_seq"] += grow
    else:
        m["dims"]["vocab_size"] += grow
        m["model"]["vocab_size"] += grow
    _write_manifest(art, m)
    want = (f"was built for {m['max_seq'] - grow} positions but the manifest records max_seq {m['max_seq']}"
            if field == "max_seq" else
            f"embeds {m['dims']['vocab_size'] - grow} tokens but the manifest records a vocabulary of "
            f"{m['dims']['vocab_size']}")
    for command in (("verify", str(art), "--backends", "ort,torch", "--limit", "1", "--max-new-tokens", "2"),
                    ("generate", str(art), "--prompt", "hi", "--max-new-tokens", "2")):
        proc = cli(*command)
        assert proc.returncode == 2 and want in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (
            proc.stdout, proc.stderr)

