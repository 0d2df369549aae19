"""Artifacts are safe to write and to read: `build --out` replaces only an earlier artifact, manifest paths stay
inside the artifact, a graph whose I/O is not the I/O table's is refused, records hold no machine paths."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from test_cli import assert_one_line_error, cli  # noqa: E402

from medusa_export.runtime.api import MedusaRuntime  # noqa: E402
from medusa_export.runtime.errors import ArtifactError, InputError  # noqa: E402
from medusa_export.runtime.build_options import BuildOptions  # noqa: E402


def _tree(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _copy(artifact, tmp_path, name="copy"):
    return shutil.copytree(artifact, tmp_path / name)


# ------------------------------------------------------------------------------------ build --out
def test_build_refuses_a_directory_that_is_not_an_artifact_before_any_work(tmp_path):
    work = tmp_path / "work"
    (work / "notes").mkdir(parents=True)
    (work / "thesis.tex").write_text("years of work")
    (work / "notes" / "a.txt").write_text("more")
    before = _tree(work)
    # The model does not exist: the --out check must come first (no loading, no export).
    proc = cli("build", str(tmp_path / "no-such-model"), "--out", str(work))
    assert_one_line_error(proc, str(work), "not a medusa-export artifact")
    assert _tree(work) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # no .partial-* left beside it


def test_build_refuses_an_out_inside_an_artifact(artifact, tmp_path):
    """It became a foreign folder of that artifact, which `build --out` could then never replace."""
    from medusa_export.exporter.output_dir import check_out_dir

    art = _copy(artifact, tmp_path)
    for inside in (art / "sub", art / "heads" / "deeper" / "x"):
        with pytest.raises(InputError, match=f"lies inside the artifact {art}"):
            check_out_dir(inside)
    check_out_dir(tmp_path / "beside")
    (tmp_path / "to_art").symlink_to(art)
    with pytest.raises(InputError, match="lies inside the artifact"):
        check_out_dir(tmp_path / "to_art" / "sub")  # through a link


def test_build_refuses_a_file_and_an_artifact_holding_foreign_files(artifact, tmp_path):
    from medusa_export.exporter.output_dir import check_out_dir

    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(InputError, match="existing file"):
        check_out_dir(f)
    art = _copy(artifact, tmp_path)
    (art / "my_results.json").write_text("{}")
    with pytest.raises(InputError, match="my_results.json"):
        check_out_dir(art)
    link = tmp_path / "link"
    link.symlink_to(art)
    with pytest.raises(InputError, match="symbolic link"):
        check_out_dir(link)
    check_out_dir(tmp_path / "new")  # a new path is fine
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty")  # so is an empty directory
    (art / "my_results.json").unlink()
    check_out_dir(art)
    # An empty folder and a link to a folder were not counted as foreign, and replacing the artifact deleted them
    (art / "emptysub").mkdir()
    with pytest.raises(InputError, match="emptysub"):
        check_out_dir(art)
    (art / "emptysub").rmdir()
    (art / "mylink").symlink_to(tmp_path / "empty")
    with pytest.raises(InputError, match="mylink"):
        check_out_dir(art)
    (art / "mylink").unlink()
    # A listed file that is a link: its target is someone's file (the docs promise links are refused)
    (tmp_path / "tokenizer.json").write_bytes((art / "tokenizer.json").read_bytes())
    (art / "tokenizer.json").unlink()
    (art / "tokenizer.json").symlink_to(tmp_path / "tokenizer.json")
    with pytest.raises(InputError, match="holds tokenizer.json"):
        check_out_dir(art)
    (art / "tokenizer.json").unlink()
    (art / "tokenizer.json").write_bytes((tmp_path / "tokenizer.json").read_bytes())
    os.mkfifo(art / "manifest.json.fifo")
    with pytest.raises(InputError, match="manifest.json.fifo"):
        check_out_dir(art)
    (art / "manifest.json.fifo").unlink()
    (art / "manifest.json").unlink()
    os.mkfifo(art / "manifest.json")  # read, it waited for a writer forever
    with pytest.raises(InputError, match="not a medusa-export artifact"):
        check_out_dir(art)


def test_build_replaces_an_earlier_artifact(tiny_dirs, artifact, tmp_path):
    from medusa_export.exporter.build import build_artifact

    out = _copy(artifact, tmp_path, "art")
    assert json.loads((out / "manifest.json").read_text())["tree"]["medusa_choices"] != [[0], [1]]
    build_artifact(str(tiny_dirs[0]), out, BuildOptions(heads=str(tiny_dirs[1]), tree="chain-1", max_seq=64), log=lambda _m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tree"]["medusa_choices"] == [[0]] and manifest["max_seq"] == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # the old one is gone, nothing else left


def test_interrupted_build_leaves_the_earlier_artifact_intact(tiny_dirs, artifact, tmp_path, monkeypatch):
    from medusa_export.exporter import build as build_mod

    out = _copy(artifact, tmp_path, "art")
    before = _tree(out)

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "validate_graph", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_mod.build_artifact(str(tiny_dirs[0]), out, BuildOptions(heads=str(tiny_dirs[1]), tree="chain-2", max_seq=64), log=lambda _m: None)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


# --------------------------------------------------------------------------------- manifest paths
@pytest.mark.parametrize("where, name", [
    ("graph", "/etc/hostname"),
    ("graph", "../outside.onnx"),
    ("files", "/etc/hostname"),
    ("files", "sub/../../outside.onnx"),
    ("heads", "../heads"),
    ("graph", "C:\\\\model.onnx"),
])
def test_manifest_paths_must_stay_inside_the_artifact(artifact, tmp_path, where, name):
    art = _copy(artifact, tmp_path)
    (tmp_path / "outside.onnx").write_bytes((art / "medusa.onnx").read_bytes())
    m = json.loads((art / "manifest.json").read_text())
    if where == "graph":
        m["graphs"]["medusa"]["file"] = name
    elif where == "files":
        m["files"][name] = m["files"]["medusa.onnx"]
    else:
        m["heads"]["directory"] = name
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="not a path inside the artifact"):
        MedusaRuntime.load(art)
    assert_one_line_error(cli("generate", str(art), "--prompt", "t1", "--no-chat", "--max-new-tokens", "2"),
                          "not a path inside the artifact")


def test_a_symlink_leading_out_of_the_artifact_is_refused(artifact, tmp_path):
    art = _copy(artifact, tmp_path)
    outside = tmp_path / "elsewhere.onnx"
    (art / "medusa.onnx").rename(outside)
    (art / "medusa.onnx").symlink_to(outside)
    with pytest.raises(ArtifactError, match="leads outside"):
        MedusaRuntime.load(art)


# ------------------------------------------------------------------------------- the I/O contract
def _edit_graph(art, edit):
    model = onnx.load(str(art / "medusa.onnx"))
    edit(model.graph)
    onnx.save(model, str(art / "medusa.onnx"))
    m = json.loads((art / "manifest.json").read_text())
    m["files"]["medusa.onnx"]["bytes"] = (art / "medusa.onnx").stat().st_size
    (art / "manifest.json").write_text(json.dumps(m))


def test_ort_refuses_a_graph_without_a_table_output(artifact, tmp_path):
    art = _copy(artifact, tmp_path)

    def drop_entropy(graph):
        keep = [o for o in graph.output if o.name != "entropy"]
        del graph.output[:]
        graph.output.extend(keep)

    _edit_graph(art, drop_entropy)
    with pytest.raises(ArtifactError, match="medusa.onnx lacks the output 'entropy'"):
        MedusaRuntime.load(art)


def test_ort_refuses_a_graph_with_an_extra_input(artifact, tmp_path):
    art = _copy(artifact, tmp_path)
    _edit_graph(art, lambda g: g.input.append(onnx.helper.make_tensor_value_info("adapter_scale", onnx.TensorProto.FLOAT, [1])))
    with pytest.raises(ArtifactError, match="unexpected input 'adapter_scale'"):
        MedusaRuntime.load(art)


def test_ort_refuses_dims_that_do_not_match_the_graph(artifact, tmp_path):
    art = _copy(artifact, tmp_path)
    m = json.loads((art / "manifest.json").read_text())
    m["dims"]["sample_topk"] = 16  # the graph emits 32
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="'next_token_ids' has shape .*32.*sample_topk"):
        MedusaRuntime.load(art)


def test_io_table_drives_step_outputs_by_name():
    from medusa_export.runtime import io_table
    from medusa_export.runtime.backends.base import StepOutput

    named = {"entropy": np.zeros(2, np.float16), "next_token_ids": np.zeros((2, 3), np.int32),
             "next_token_probs": np.ones((2, 3), np.float32), "input_token_probs": np.eye(2, dtype=np.float32)}
    out = StepOutput.from_named(named)  # any order; dtypes normalised to the table's
    assert out.next_ids.dtype == np.int64 and out.entropy.dtype == np.float32 and out.medusa_ids is None
    assert np.array_equal(out.input_probs, np.eye(2))
    with pytest.raises(ValueError, match="entropy"):
        StepOutput.from_named({k: v for k, v in named.items() if k != "entropy"})
    fields = {t.field for t in io_table.reduced_outputs(True)}
    assert fields == {"next_ids", "next_probs", "input_probs", "entropy", "medusa_ids"}


# ---------------------------------------------------------------------------------- records
def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_weights_damaged_into_nans_end_the_request_with_an_engine_error(artifact, tmp_path, temperature):
    """Loading checks sizes, not contents (`verify` does): weights overwritten with NaN bytes of the same size made
    sampling fail inside numpy with a traceback, and greedy decoding answer token 0 at every step."""
    from medusa_export.runtime.errors import EngineError

    art = _copy(artifact, tmp_path)
    weights = art / "weights.bin"
    weights.write_bytes(b"\xff" * weights.stat().st_size)  # every float32 a NaN
    with MedusaRuntime.load(art) as rt:
        with pytest.raises(EngineError, match="probabilities are not finite .*medusa-export verify"):
            rt.generate([1, 2, 3], max_new_tokens=4, temperature=temperature, seed=1)
    proc = cli("generate", str(art), "--prompt", "hello", "--max-new-tokens", "4", "--temperature", str(temperature))
    assert_one_line_error(proc, "probabilities are not finite")


def test_manifest_holds_no_machine_paths(artifact, tiny_dirs):
    m = json.loads((artifact / "manifest.json").read_text())
    leaked = [s for s in _strings(m) if os.path.isabs(s) or str(tiny_dirs[0].parent) in s]
    assert leaked == []
    assert m["model"]["source"] == tiny_dirs[0].name and len(m["model"]["sha256"]) == 64
    assert m["heads"]["source"] == tiny_dirs[1].name and len(m["heads"]["sha256"]) == 64


def test_base_model_is_found_on_this_machine_or_named_with_model(artifact, tiny_dirs, tmp_path, monkeypatch):
    """The PyTorch reference finds the base model where this machine loaded it; elsewhere it asks for --model."""
    from medusa_export.runtime.errors import ModelError

    rt = MedusaRuntime.load(artifact, backend="torch")  # the build loaded it here
    assert rt.generator.backend.name == "torch"
    monkeypatch.setenv("MEDUSA_EXPORT_CACHE", str(tmp_path / "fresh-cache"))  # "another machine"
    with pytest.raises(ModelError, match="--model"):
        MedusaRuntime.load(artifact, backend="torch")
    assert MedusaRuntime.load(artifact, backend="torch", model=str(tiny_dirs[0])).generator.backend.name == "torch"
    other = shutil.copytree(tiny_dirs[0], tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5 if cfg.get("rms_norm_eps") != 1e-5 else 1e-6
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="not the one the artifact was built from"):
        MedusaRuntime.load(artifact, backend="torch", model=str(other))
