"""Valid typed manifests and engine records for tests that need one without building an artifact, and a
fake artifact directory around one (a tokenizer and placeholder graph files: enough to load the manifest)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from medusa_export.runtime.backends.base import ModelDims
from medusa_export.runtime.manifest import (FORMAT, FORMAT_VERSION, BuilderFlags, EngineRecord, ExporterRecord,
                                             GraphRecord, HeadsRecord, Manifest, ModelRecord, ProfileRecord,
                                             QuantizationRecord, TreeRecord, file_record, kv_layout_of)


def sample_manifest(num_heads: int = 0, graph_format: str = "portable", weights: str = "fp32", max_seq: int = 32,
                    num_layers: int = 1, tree: list[list[int]] | None = None, files: dict | None = None,
                    head_topk: int = 1) -> Manifest:
    tree = tree if tree is not None else [[0] * (d + 1) for d in range(num_heads)]  # a chain: ranks within top-1
    dims = ModelDims(num_layers=num_layers, num_kv_heads=1, head_dim=8, vocab_size=2, num_heads=num_heads,
                     head_topk=head_topk, sample_topk=1, dtype="float16" if weights == "fp16" else "float32")
    kinds = ["vanilla"] + (["medusa"] if num_heads else [])
    quant = None
    if weights in ("int8", "int4"):
        quant = QuantizationRecord(weights, "MatMulNBits", int(weights[3:]), 32, True, 4, 1, "onnxruntime", 1, 0)
    graphs = {k: GraphRecord(f"{k}.onnx", [], [], quantization=quant) for k in kinds}
    return Manifest(
        format=FORMAT, format_version=FORMAT_VERSION, package_version="0.2.0",
        exporter=ExporterRecord("2.13.0", "5.0", "1.17", 21, "3.11"),
        model=ModelRecord("tiny", "tiny", "0" * 16, None, "llama", 8, num_layers, 2),
        heads=HeadsRecord(num_heads, 1, "shared", False, None, None, None),
        dims=dims, max_seq=max_seq, tree=TreeRecord("test", tree, len(tree) + 1),
        graph_format=graph_format, kv_layout=kv_layout_of(graph_format), weights=weights, graphs=graphs,
        validation={}, files=files if files is not None else {})


def sample_engine_record(**changes) -> EngineRecord:
    record = EngineRecord(file="medusa.plan", onnx="medusa.onnx", tensorrt_version="10.3.0.26", gpu_name="NVIDIA H100",
                          compute_capability="9.0", cuda_runtime="12.4", precision="fp16", strongly_typed=True,
                          builder_flags=BuilderFlags([], []), profiles=[ProfileRecord("decode", (1, 1, 1), (0, 8, 31),
                                                                                        (1, 9, 32))],
                          workspace_bytes=None, timing_cache="timing.cache", build_s=1.0)
    return dataclasses.replace(record, **changes)


def write_fake_artifact(directory: Path, manifest: Manifest | None = None) -> Path:
    """A directory the manifest check accepts: tokenizer.json, an empty model per (portable) graph, the manifest."""
    from tokenizers import Tokenizer, models

    manifest = manifest or sample_manifest()
    directory.mkdir(parents=True, exist_ok=True)
    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(directory / "tokenizer.json"))
    for graph in manifest.graphs.values():  # an empty ONNX model (no fields): reading the manifest parses its graphs
        (directory / graph.file).write_bytes(b"")
    files = {name: file_record(directory / name) for name in ["tokenizer.json", *(g.file for g in manifest.graphs.values())]}
    manifest.replace(files=files).write(directory)
    return directory


def manifest_json(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def assert_round_trips(directory: Path) -> Manifest:
    """The typed spec reads the manifest a build wrote and writes back exactly the same JSON."""
    data = manifest_json(directory)
    manifest = Manifest.from_json(data)
    assert manifest.to_json() == data
    return manifest
