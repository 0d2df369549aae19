"""The artifact spec: every manifest the build writes reads back exactly, and every malformed manifest,
tokenizer file or config is refused by the commands with exit 2 and one line naming the file and the field."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from manifest_samples import assert_round_trips, sample_manifest
from test_cli import assert_one_line_error

from medusa_export.runtime.errors import ArtifactError
from medusa_export.runtime.manifest import FORMAT_VERSION, Manifest
from medusa_export.runtime.typed_json import to_json


@pytest.mark.parametrize("which", ["artifact", "portable_artifact"])
def test_built_manifests_round_trip(which, request):
    m = assert_round_trips(request.getfixturevalue(which))
    assert m.format_version == FORMAT_VERSION and m.dims.num_heads == 3
    assert set(m.graphs) == ({"medusa", "vanilla", "lanes"} if m.graph_format == "onnxruntime" else {"medusa", "vanilla"})


def test_sample_manifest_round_trips_and_checks_across_fields():
    m = sample_manifest(num_heads=2)
    assert Manifest.from_json(m.to_json()) == m
    bad = m.to_json() | {"kv_layout": "head-major-shared"}  # portable graphs are sequence-major
    with pytest.raises(ArtifactError, match="field kv_layout must be 'sequence-major' for portable graphs"):
        Manifest.from_json(bad)


def test_an_engine_plan_must_be_a_listed_file():
    """A plan the manifest did not list was deserialized with no size or sha256 check (`verify` skipped it)."""
    from manifest_samples import sample_engine_record
    from medusa_export.runtime.manifest import FileRecord

    listed = {name: FileRecord("0" * 64, 1) for name in ("medusa.onnx", "medusa.plan")}
    m = sample_manifest(num_heads=2, files=listed)
    data = m.to_json() | {"engines": {"medusa": to_json(sample_engine_record())}}
    assert Manifest.from_json(data).engines["medusa"].file == "medusa.plan"
    for key, name in (("file", "unlisted.plan"), ("onnx", "other.onnx")):
        engines = {"medusa": to_json(sample_engine_record(**{key: name}))}
        with pytest.raises(ArtifactError, match=f"field engines.medusa.{key} must be one of the files"):
            Manifest.from_json(m.to_json() | {"engines": engines})


_QUALITY = {"prompts": 4, "positions": 200, "max_new_tokens": 64, "top1_agreement": 0.98, "perplexity_reference": 3.1,
            "perplexity": 3.2, "perplexity_change": 0.03, "bar": 0.98, "passes": True}


@pytest.mark.parametrize("field, value, words", [
    ("top1_agreement", float("nan"), "field quality.top1_agreement must be a finite number, not nan"),
    ("perplexity", float("inf"), "field quality.perplexity must be a finite number, not inf"),
    ("perplexity_change", -float("inf"), "field quality.perplexity_change must be a finite number, not -inf"),
    ("perplexity", 10**400, "field quality.perplexity must be a finite number, not an integer of 401 digits"),
    ("top1_agreement", 1.5, "field quality.top1_agreement must be a share between 0 and 1, not 1.5"),
    ("perplexity_reference", 0.0, "field quality.perplexity_reference must be above 0"),
    ("positions", 0, "field quality.positions must be at least 1"),
])
def test_quality_records_hold_finite_numbers_in_range(field, value, words):
    """json.loads reads NaN and Infinity: a quality record holding them said nothing true (and compared false
    with every bar), so the manifest is refused naming the field."""
    data = sample_manifest().to_json() | {"quality": _QUALITY}
    assert Manifest.from_json(data).quality.top1_agreement == 0.98
    text = json.dumps(data | {"quality": _QUALITY | {field: value}})  # NaN / Infinity as json.dumps writes them
    with pytest.raises(ArtifactError, match=re.escape(words)):
        Manifest.from_json(json.loads(text))


def _edit_manifest(data: dict, path: str | tuple, value) -> dict:
    """Set (or with ``value`` DELETE remove) the dotted ``path`` (or tuple of keys) in a copy of ``data``."""
    data = json.loads(json.dumps(data))
    *parents, last = path.split(".") if isinstance(path, str) else path
    node = data
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


DELETE = object()
# (file, how to break it, words the one-line error must hold)
BROKEN = [
    ("manifest.json", b"[]", ["manifest.json", "JSON object"]),
    ("manifest.json", b"{not json", ["manifest.json", "not valid JSON"]),
    ("manifest.json", ("dims", DELETE), ["manifest.json", "field dims is missing"]),
    ("manifest.json", (("files", "medusa.onnx"), 7), ["manifest.json", "field files.medusa.onnx must be an object"]),
    ("manifest.json", ("graphs.medusa.paths", "4"), ["field graphs.medusa.paths must be an integer"]),
    ("manifest.json", ("dims.num_layers", 0), ["field dims.num_layers must be an integer of at least 1"]),
    ("manifest.json", ("dims.dtype", "float64"), ["field dims.dtype"]),
    ("manifest.json", ("weights", "int3"), ["field weights must be one of"]),
    ("manifest.json", ("tree.num_nodes", 3), ["field tree.num_nodes must be len(medusa_choices) + 1"]),
    ("manifest.json", ("tree.medusa_choices", [[0, "a"]]), ["field tree.medusa_choices[0][1] must be an integer"]),
    ("manifest.json", ("graphs.vanilla", DELETE), ["field graphs must hold the graphs"]),
    ("manifest.json", ("heads.num_heads", 2), ["field heads.num_heads must equal dims.num_heads"]),
    ("manifest.json", ("max_seq", 8), ["field max_seq must be at least 16"]),
    ("manifest.json", ("adapters", {}), ["field adapters is not a field of this format"]),
    ("manifest.json", ("format_version", 99), ["format version 99, written by medusa-export 0.2.0", "reads version 3"]),
    ("tokenizer_config.json", "garbage", ["tokenizer_config.json is not valid JSON"]),
    ("tokenizer_config.json", b"[1, 2]", ["tokenizer_config.json must hold a JSON object"]),
    ("tokenizer_config.json", {"chat_template": 5}, ["tokenizer_config.json: field chat_template must be a string"]),
    ("tokenizer_config.json", {"eos_token": ["x"]}, ["tokenizer_config.json: field eos_token must be a string"]),
    ("generation_config.json", {"eos_token_id": "x"}, ["generation_config.json: field eos_token_id"]),
    ("generation_config.json", {"eos_token_id": [99999]}, ["generation_config.json: field eos_token_id"]),
    ("tokenizer.json", "garbage", ["tokenizer.json is corrupt"]),
    # JSON that json.loads refuses with ValueError or RecursionError, not JSONDecodeError
    ("manifest.json", b'{"max_seq": ' + b"9" * 5000 + b"}", ["manifest.json is not usable JSON", "4300 digits"]),
    ("manifest.json", b"[" * 100000 + b"]" * 100000, ["manifest.json is not usable JSON (nested too deeply)"]),
    ("generation_config.json", b'{"eos_token_id": ' + b"1" * 5000 + b"}", ["generation_config.json is not usable"]),
    ("tokenizer_config.json", b"[" * 100000 + b"]" * 100000, ["tokenizer_config.json is not usable JSON"]),
    # sizes past the spec's bounds (the runtime would allocate them)
    ("manifest.json", ("max_seq", 10**10), ["field max_seq must be at most 1048576, not 10000000000"]),
    ("manifest.json", ("max_seq", 10**19), ["field max_seq must be at most 1048576"]),
    ("manifest.json", ("graphs.medusa.paths", 10**6), ["field graphs.medusa.paths must be at most 512"]),
    ("manifest.json", ("graphs.lanes.lanes", 5000), ["field graphs.lanes.lanes must be at most 1024"]),
    ("manifest.json", ("dims.num_kv_heads", 10**9), ["field dims.num_kv_heads must be at most 1024"]),
    # file names that would make a message of several lines (or colour a terminal); a repeated key
    ("manifest.json", (("files", "evil\n\x1b[31mFAKE: all good.bin"), {"sha256": "0" * 64, "bytes": 1}),
     ["not a file name a build writes"]),
    ("manifest.json", (("files", "x" * 300), {"sha256": "0" * 64, "bytes": 1}), ["over 255 characters"]),
    # an end-of-sequence token the tokenizer does not know
    ("tokenizer_config.json", {"eos_token": "nonexistent-token"},
     ["tokenizer_config.json: field eos_token 'nonexistent-token' is not a token of tokenizer.json"]),
    # chat templates that do not compile: refused at load, not at the first chat request
    ("chat_template.jinja", b"{% for %}", ["chat_template.jinja does not compile", "fix the template or remove it"]),
    ("tokenizer_config.json", {"chat_template": "{% for %}"},
     ["tokenizer_config.json field chat_template does not compile"]),
]


def _break(art, name: str, how) -> None:
    """Break ``name`` in ``art``; "garbage" keeps the file's size (so the size check passes) and the manifest."""
    path = art / name
    if how == "garbage":
        path.write_bytes(b"\x00garbage" * (path.stat().st_size // 8) + b"!" * (path.stat().st_size % 8))
        return
    if name == "manifest.json" and isinstance(how, tuple):
        data = _edit_manifest(json.loads(path.read_text()), *how)
    elif isinstance(how, bytes):
        path.write_bytes(how)
        data = None
    else:
        data = how
    if data is not None:
        path.write_text(json.dumps(data))
    if name != "manifest.json":  # keep the manifest's record of the file in step, so the file itself is read
        manifest = json.loads((art / "manifest.json").read_text())
        from medusa_export.runtime.manifest import file_record

        rec = file_record(path)
        manifest["files"][name] = {"sha256": rec.sha256, "bytes": rec.bytes}
        (art / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name, how, words", BROKEN, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BROKEN)])
def test_malformed_artifact_files_are_one_line_errors(artifact, tmp_path, name, how, words):
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    _break(art, name, how)
    code = "import sys; from medusa_export.runtime.cli.app import main; sys.argv[0] = 'medusa-export'; main()"
    proc = subprocess.run([sys.executable, "-c", code, "generate", str(art), "-p", "t5 t6", "--max-new-tokens", "2"],
                          capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc, *words)


@pytest.mark.parametrize("name, how, words", [BROKEN[0], BROKEN[3], BROKEN[16], BROKEN[-2]])
def test_serve_refuses_malformed_artifacts_in_one_line(artifact, tmp_path, name, how, words):
    pytest.importorskip("uvicorn")
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    _break(art, name, how)
    code = "import sys; from medusa_export.runtime.cli.app import main; sys.argv[0] = 'medusa-export'; main()"
    proc = subprocess.run([sys.executable, "-c", code, "serve", str(art), "--port", "0"], capture_output=True,
                          text=True, timeout=120)
    assert_one_line_error(proc, *words)


# From a later attack: text an artifact carries that went out with every streamed chunk (the model name), to the
# template worker with every render (the bos token, the template's source), or that raised a bare ValueError (a
# template writing the marks of message text itself, with more digits than int() reads).
MORE_BROKEN = [
    ("tokenizer_config.json", {"bos_token": "x" * 300}, ["field bos_token has 300 characters (at most 256)"]),
    ("tokenizer_config.json", {"chat_template": "{#" + "x" * (1 << 17) + "#}"},
     ["field chat_template is a chat template of 131076 characters (at most 131072)"]),
    ("tokenizer_config.json", {"chat_template": "\ufdd0" + "9" * 5000 + "\ufdd1"},
     ["writes the noncharacters U+FDD0 / U+FDD1 itself", "fix the template"]),
]


@pytest.mark.parametrize("name, how, words", MORE_BROKEN, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(MORE_BROKEN)])
def test_artifact_text_past_its_bounds_is_a_one_line_error(artifact, tmp_path, name, how, words):
    test_malformed_artifact_files_are_one_line_errors(artifact, tmp_path, name, how, words)


@pytest.mark.parametrize("field, value, shown", [
    ("model.name", "x" * 300, "x" * 255), ("model.name", "tiny\nFAKE: all good", "tiny?FAKE: all good"),
    ("model.name", "coder\u200d-model", "coder?-model"), ("heads.source", "\x1b[31mred", "?[31mred"),
    ("tree.name", "a\tb", "a?b")])
def test_manifest_names_are_read_as_builds_record_them(field, value, shown):
    """Names go out with every streamed chunk and into logs: a 16 MB one went out with every token, a newline forged
    a log line. They are read as `build` records them (printable, at most 255 characters), so that an artifact
    built before builds cleaned them still loads."""
    from medusa_export.exporter.provenance import record_name

    section, key = field.split(".")
    data = sample_manifest().to_json()
    data[section][key] = value
    assert getattr(getattr(Manifest.from_json(data), section), key) == shown == record_name(value)


def test_engine_profiles_are_checked_with_the_manifest():
    """A profile the TensorRT backend could not use was a bare ValueError once its engine was deserialized."""
    from medusa_export.runtime.manifest import ProfileRecord
    from manifest_samples import sample_engine_record

    for seq, past, total, batch, words in [((0, 1, 1), (0, 8, 31), (0, 9, 32), (1, 1, 1), "seq and batch must start"),
                                           ((1, 1, 1), (0, 40, 31), (1, 41, 32), (1, 1, 1), "past must be min <= opt"),
                                           ((1, 1, 1), (0, 8, 31), (1, 9, 33), (1, 1, 1), "total must be past + seq")]:
        data = to_json(sample_engine_record(profiles=[ProfileRecord("decode", (1, 1, 1), (0, 8, 31), (1, 9, 32))]))
        data["profiles"][0].update(seq=list(seq), past=list(past), total=list(total), batch=list(batch))
        manifest = sample_manifest().to_json() | {"engines": {"vanilla": data | {"onnx": "vanilla.onnx"}}}
        with pytest.raises(ArtifactError, match=re.escape(f"field engines.vanilla.profiles[0].{words}")):
            Manifest.from_json(manifest)
    batch_only = ProfileRecord("batch", (1, 1, 4), (0, 8, 27), (1, 9, 31), (1, 4, 4))
    with pytest.raises(ValueError, match="must hold a one-sequence profile"):
        sample_engine_record(profiles=[batch_only])


def test_a_corpus_table_record_has_a_bounded_size():
    from medusa_export.runtime.manifest import DraftsRecord

    with pytest.raises(ValueError, match="entries must be at most 268435456"):
        DraftsRecord(file="corpus_drafts.npz", source="x", corpus_tokens=1, max_ngram=4, min_count=3, entries=1 << 40)


def test_a_key_repeated_in_the_manifest_is_refused(artifact, tmp_path):
    """json.loads keeps the last of a repeated key: a reader of the file could see another max_seq than the loader."""
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    text = (art / "manifest.json").read_text()
    (art / "manifest.json").write_text(text.replace("{", '{"max_seq": 999999, ', 1))
    with pytest.raises(ArtifactError, match="the key 'max_seq' appears twice in one object"):
        Manifest.read(art)


def test_a_manifest_from_another_release_names_the_release_that_wrote_it():
    data = sample_manifest().to_json() | {"format_version": 4, "package_version": "0.9.1"}
    with pytest.raises(ArtifactError) as e:
        Manifest.from_json(data, "art/manifest.json")
    assert str(e.value) == ("art/manifest.json is artifact format version 4, written by medusa-export 0.9.1; this "
                            "medusa-export 0.2.0 reads version 3: rebuild the artifact with this version "
                            "(`medusa-export build`), or load it with medusa-export 0.9.1")


@pytest.mark.parametrize("rank", [10 ** 4000, 2 ** 63, -1], ids=["4001-digits", "2**63", "-1"])
def test_a_tree_rank_outside_the_graph_s_heads_names_the_field(artifact, rank):
    """It was refused only when the tree was built, as "tree path [...] uses rank ..." with the number in full (up
    to 8.6 KB on one line), naming neither the file nor the field."""
    data = json.loads((artifact / "manifest.json").read_text())
    data["tree"]["medusa_choices"][0] = [rank]
    with pytest.raises(ArtifactError) as e:
        Manifest.from_json(data)
    message = str(e.value)
    assert "field tree.medusa_choices[0]" in message and "rebuild the artifact" in message
    assert len(message.splitlines()) == 1 and len(message) < 300


def test_a_tree_path_deeper_than_the_heads_names_the_field(artifact):
    data = json.loads((artifact / "manifest.json").read_text())
    data["tree"]["medusa_choices"][0] = [0] * (data["dims"]["num_heads"] + 1)
    with pytest.raises(ArtifactError, match=r"field tree\.medusa_choices\[0\] must be a path"):
        Manifest.from_json(data)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), [1.0, {"deep": float("-inf")}]])
def test_a_report_field_holds_no_nan_or_infinity_either(artifact, value):
    """`validation` is free-form (errors measured at build), yet the document promises finite numbers: NaN loaded."""
    data = json.loads((artifact / "manifest.json").read_text())
    data["validation"]["medusa"]["max_abs_error"] = value
    with pytest.raises(ArtifactError, match=r"field validation\.medusa\.max_abs_error.* must be a finite number"):
        Manifest.from_json(data)


@pytest.mark.parametrize("choices, problem", [([[0], [0]], "repeats a path"),
                                              ([[0], [1, 0]], r"holds \[1, 0\] without its parent \[1\]")])
def test_a_tree_that_is_not_one_names_the_manifest_field(artifact, choices, problem):
    """A repeated path, or one whose parent is missing, was refused only when the tree was built: as a TreeError
    whose fix said to edit the tree, naming neither the manifest nor a rebuild."""
    data = json.loads((artifact / "manifest.json").read_text())
    data["tree"] |= {"medusa_choices": choices, "num_nodes": len(choices) + 1}
    with pytest.raises(ArtifactError, match=rf"field tree\.medusa_choices {problem}: rebuild the artifact"):
        Manifest.from_json(data)
