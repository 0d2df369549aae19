"""The artifact spec: `Manifest`, the typed form of an artifact's ``manifest.json``, checked once when read.

    manifest = Manifest.read("artifacts/smollm2")                  # format, version, every field, paths, sizes
    manifest = Manifest.read(d, check_hashes=True)                 # ... and every file's sha256 (`verify`)
    manifest.dims.num_layers, manifest.graphs["medusa"].paths, manifest.tree.medusa_choices
    path = artifact_file(d, manifest.graphs["medusa"].file)       # `artifact_files`: inside the artifact, or ArtifactError
    path = manifest.listed_file(d, "chat_template.jinja")         # None unless listed; there but unlisted: error
    manifest.write(d)                                              # atomically (build and the engine builder)

Build (`exporter/build.py`) and the engine builder (`engines/builder.py`) write it; everything else reads these
dataclasses, never the JSON. A manifest of another format version is refused with the version that wrote it;
a field of the wrong type or value is refused with its dotted path (``graphs.medusa.paths must be an integer,
not a string``). Every file it names is relative to the artifact directory and must stay inside it: absolute
names, ``..`` and symlinks that lead out are refused before anything is opened. Only listed files are read:
a tokenizer-side file (`TOKENIZER_FILES`) there but not listed is refused. Sizes have upper bounds (`LIMITS`).
The records it holds (files, model, heads, tree, graphs, drafts, quality) are in `manifest_records.py`.

Layout of an artifact directory::

    manifest.json        this file (written last: a directory without it is not an artifact)
    medusa.onnx          backbone + fused heads;  vanilla.onnx  backbone only (the honest baseline)
    tokenizer.json, tokenizer_config.json, generation_config.json
    heads/               the heads' safetensors + config (for the PyTorch reference / rebuilds)
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import __version__, io_table
from .backends.base import ModelDims
from .artifact_files import (MANIFEST, artifact_dir, artifact_file, check_file, check_graph_tables, is_file,
                             present, sha256_file)
from .errors import ArtifactError
from .manifest_records import (DRAFTS_FILE, LIMITS, CleanupRecord, DraftsRecord,  # noqa: F401 - part of the spec
                               ExporterRecord, FileRecord, GraphRecord, HeadsRecord, ModelRecord, QualityRecord,
                               QuantizationRecord, TensorRecord, TreeRecord, positive, short_int)
from .plan_records import BuilderFlags, EngineRecord, ProfileRecord  # noqa: F401 - part of the spec
from .typed_json import FieldError, json_object_or_none, parse, read_json, to_json

FORMAT = "medusa-export-artifact"
FORMAT_VERSION = 3  # 3: the typed spec (every field checked; graph_format, kv_layout and weights required)
# Read by fixed name (runtime/tokenizer.py), so only when the manifest lists them; one present but not listed is refused.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")
# `build` assembles an artifact in a work directory holding this marker (locked by the building process) until it
# swaps it into place: killed before that (SIGKILL, a power cut), the directory has a manifest but not every check,
# and must not load.
UNFINISHED = ".unfinished-build"
_BUILDING: set[str] = set()  # work directories this process is building (it loads them to check its graphs)
PORTABLE, ONNXRUNTIME = "portable", "onnxruntime"  # graph formats: standard ops (ORT + TensorRT) / fused (ORT only)
GRAPH_FORMATS = (ONNXRUNTIME, PORTABLE)
WEIGHTS = ("fp32", "fp16", "int8", "int4")  # `build --dtype`
QUANTIZED_WEIGHTS = ("int8", "int4")  # MatMulNBits weights: fp32 activations and KV cache, ONNX Runtime only
GRAPH_KINDS = ("medusa", "vanilla", "lanes")  # lanes: several sequences per step (continuous batching)
_KV_LAYOUT_OF = {ONNXRUNTIME: io_table.HEAD_MAJOR_SHARED, PORTABLE: io_table.SEQUENCE_MAJOR}
_DTYPE_OF = {"fp32": "float32", "fp16": "float16", "int8": "float32", "int4": "float32"}  # graph / KV dtype
# Upper bounds of the model's dimensions, far above any real model (`LIMITS`: the other fields').
DIMS_LIMITS = {"num_layers": 1024, "num_kv_heads": 1024, "head_dim": 4096, "vocab_size": 1 << 22, "num_heads": 64,
               "head_topk": 1024, "sample_topk": 1024}


@dataclass(frozen=True)
class Manifest:
    format: str
    format_version: int
    package_version: str
    exporter: ExporterRecord
    model: ModelRecord
    heads: HeadsRecord
    dims: ModelDims
    max_seq: int
    tree: TreeRecord
    graph_format: Literal["onnxruntime", "portable"]
    kv_layout: Literal["sequence-major", "head-major-shared"]
    weights: Literal["fp32", "fp16", "int8", "int4"]
    graphs: dict[str, GraphRecord]
    validation: dict[str, dict[str, Any]]  # per graph: the errors measured against PyTorch (a report)
    files: dict[str, FileRecord]
    engines: dict[str, EngineRecord] = field(default_factory=dict)
    quality: QualityRecord | None = None
    drafts: DraftsRecord | None = None
    attention: Literal["gqa", "kernel"] = "gqa"  # the fused graphs' attention operator (runtime/kernels: "kernel")
    lm_head: Literal["full", "screened"] = "full"  # "screened": the int8-screened fp32 lm_head (runtime/kernels)

    def __post_init__(self) -> None:
        positive(self, "max_seq", minimum=16)
        for name, most in DIMS_LIMITS.items():
            if getattr(self.dims, name) > most:
                raise FieldError(f"dims.{name}", f"must be at most {most}, not {short_int(getattr(self.dims, name))}")
        if self.kv_layout != _KV_LAYOUT_OF[self.graph_format]:
            raise FieldError("kv_layout", f"must be {_KV_LAYOUT_OF[self.graph_format]!r} for {self.graph_format} graphs")
        if self.dims.dtype != _DTYPE_OF[self.weights]:
            raise FieldError("dims.dtype", f"must be {_DTYPE_OF[self.weights]!r} for {self.weights} weights")
        expected = {"vanilla"} | ({"medusa"} if self.dims.num_heads else set())
        if set(self.graphs) - {"lanes"} != expected:
            raise FieldError("graphs", f"must hold the graphs {sorted(expected)} (and lanes), not {sorted(self.graphs)}")
        if "lanes" in self.graphs and (self.graphs["lanes"].lanes < 2 or self.graph_format != ONNXRUNTIME):
            raise FieldError("graphs.lanes.lanes", "must be at least 2, in a fused (onnxruntime) artifact")
        if any(g.lanes for kind, g in self.graphs.items() if kind != "lanes"):
            raise FieldError("graphs", "only the lanes graph has lanes")
        for kind, graph in self.graphs.items():
            if graph.paths > 1 and (kind != "medusa" or self.graph_format != ONNXRUNTIME):
                raise FieldError(f"graphs.{kind}.paths", "can exceed 1 only for the fused medusa graph")
            if graph.source_blocks and (self.weights != "fp32" or self.attention != "kernel"):
                raise FieldError(f"graphs.{kind}.source_blocks", "can be non-zero only with fp32 weights and attention "
                                 "'kernel' (BlockMatMulF32Q4 runs in the kernel library)")
            if (graph.quantization is not None) != (self.weights in QUANTIZED_WEIGHTS):
                raise FieldError(f"graphs.{kind}.quantization", f"must be {'set' if self.quantized else 'null'} "
                                 f"for {self.weights} weights")
        if self.dims.num_heads and not self.tree.medusa_choices:  # "Medusa" would decode without a guess of theirs
            raise FieldError("tree.medusa_choices", "must hold at least one path: the artifact has heads")
        for i, path in enumerate(self.tree.medusa_choices):  # named here, not later as "the tree" with its numbers
            if not 1 <= len(path) <= self.dims.num_heads or any(not 0 <= r < self.dims.head_topk for r in path):
                raise FieldError(f"tree.medusa_choices[{i}]", f"must be a path of 1 to dims.num_heads "
                                 f"({self.dims.num_heads}) ranks, each in 0..{self.dims.head_topk - 1}")
        paths = {tuple(p) for p in self.tree.medusa_choices}
        orphan = next((p for p in sorted(paths) if len(p) > 1 and p[:-1] not in paths), None)
        if len(paths) < len(self.tree.medusa_choices) or orphan:
            raise FieldError("tree.medusa_choices", f"holds {list(orphan)} without its parent {list(orphan[:-1])}"
                             if orphan else "repeats a path")
        if self.heads.num_heads != self.dims.num_heads:
            raise FieldError("heads.num_heads", f"must equal dims.num_heads ({self.dims.num_heads})")
        if (self.model.num_layers, self.model.vocab_size) != (self.dims.num_layers, self.dims.vocab_size):
            raise FieldError("model", "num_layers and vocab_size must equal those of dims")
        if self.attention == "kernel" and self.graph_format != ONNXRUNTIME:
            raise FieldError("attention", "can be 'kernel' only in a fused (onnxruntime) artifact")
        if self.dims.cache_differs and (self.attention != "kernel" or self.dims.kv_dtype != "float16"):
            raise FieldError("dims.kv_dtype", "can differ from dims.dtype only as 'float16' with attention 'kernel'")
        if self.lm_head == "screened" and (self.attention != "kernel" or self.weights not in ("fp32", "int8", "int4")):
            raise FieldError("lm_head", "can be 'screened' only with fp32, int8 or int4 weights and attention 'kernel'")
        if self.engines and self.graph_format != PORTABLE:
            raise FieldError("engines", "TensorRT engines need portable graphs")
        for kind, engine in self.engines.items():
            if kind not in self.graphs:
                raise FieldError(f"engines.{kind}", "names no graph of this artifact")
            for key in ("file", "onnx"):  # a plan not listed would be deserialized unchecked by size or sha256
                if getattr(engine, key) not in self.files:
                    raise FieldError(f"engines.{kind}.{key}", "must be one of the files the manifest lists")
        if self.drafts is not None and self.drafts.file not in self.files:
            raise FieldError("drafts.file", "must be one of the files the manifest lists")
        if self.drafts is None and DRAFTS_FILE in self.files:  # else the table would go unused without a word
            raise FieldError("drafts", f"is missing while the manifest lists {DRAFTS_FILE}")

    @property
    def quantized(self) -> bool:
        return self.weights in QUANTIZED_WEIGHTS

    @property
    def has_heads(self) -> bool:
        return self.dims.num_heads > 0

    @property
    def lanes(self) -> int:
        """Sequences one batched step takes (0: no lanes graph; sequences then take turns)."""
        return self.graphs["lanes"].lanes if "lanes" in self.graphs else 0

    @property
    def engine_lanes(self) -> int:
        """Sequences one batched TensorRT step takes (the vanilla engine's batch profile; 0: none)."""
        record = self.engines.get("vanilla")
        return max((p.batch[2] for p in record.profiles if p.batch[2] > 1), default=0) if record else 0

    def named_files(self) -> list[str]:
        """Every path the manifest names: the file records, graphs, engines and the heads directory."""
        names = list(self.files) + [g.file for g in self.graphs.values()]
        names += [n for e in self.engines.values() for n in (e.file, e.onnx)]
        return names + ([self.heads.directory] if self.heads.directory is not None else [])

    def replace(self, **changes) -> "Manifest":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        data = to_json(self)
        # Fields added since the format version (none of their defaults) are left out: an artifact that does not use
        # them stays readable by releases before them.
        if data.get("drafts") is None:
            data.pop("drafts", None)
        elif not (data["drafts"]["answers_tokens"] or data["drafts"]["answers_weight"]):
            for name in ("answers_tokens", "answers_weight"):
                data["drafts"].pop(name)
        for graph in data["graphs"].values():
            if graph.get("quantization") and not graph["quantization"].get("lm_head_rotation"):
                graph["quantization"].pop("lm_head_rotation", None)
            if not graph.get("source_blocks"):
                graph.pop("source_blocks", None)
        if data.get("lm_head") == "full":
            data.pop("lm_head")
        return data

    @classmethod
    def from_json(cls, data: Any, source: str = MANIFEST) -> "Manifest":
        """Check the format and version first (their message names the version that wrote it), then every field."""
        if not isinstance(data, dict):
            raise ArtifactError(f"{source} must hold a JSON object, not {type(data).__name__}: rebuild the artifact "
                                f"with `medusa-export build`")
        if data.get("format") != FORMAT:
            raise ArtifactError(f"{source} is not a medusa-export manifest (format {data.get('format')!r:.40}): "
                                f"rebuild the artifact with `medusa-export build`")
        version, writer = data.get("format_version"), data.get("package_version")
        if version != FORMAT_VERSION:
            other = f", or load it with medusa-export {writer!s:.20}" if writer != __version__ else ""
            raise ArtifactError(
                f"{source} is artifact format version {version!r:.20}, written by medusa-export {writer!s:.20}; this "
                f"medusa-export {__version__} reads version {FORMAT_VERSION}: rebuild the artifact with this version "
                f"(`medusa-export build`){other}")
        try:
            return parse(cls, data)
        except FieldError as e:  # a path holds the manifest's own keys: shown on one line, short
            where = e.path if e.path.isprintable() and len(e.path) <= 200 else repr(e.path)[:200]
            raise ArtifactError(f"{source}: field {where or '(top level)'} {e.problem}: rebuild the artifact with "
                                f"`medusa-export build`") from None

    @classmethod
    def read(cls, directory: str | Path, check_hashes: bool = False) -> "Manifest":
        """Read and check the manifest: format, version, every field, every named path inside the artifact, every
        listed file present with its recorded size (and its sha256 when ``check_hashes``), graphs built for its
        vocabulary (and fused ones for its max_seq), no tokenizer-side file present that it does not list."""
        directory = artifact_dir(directory)
        check_finished(directory)
        path = artifact_file(directory, MANIFEST)
        if not is_file(path):
            raise ArtifactError(f"{directory} has no {MANIFEST}: not a complete artifact, rebuild it with `medusa-export build`")
        manifest = cls.from_json(read_json(path, unique_keys=True), str(path))
        for name in manifest.named_files():  # all of them before any file is opened
            artifact_file(directory, name)
        for name, rec in manifest.files.items():
            check_file(directory / name, rec, check_hashes)
        for kind, graph in manifest.graphs.items():
            if graph.file not in manifest.files:
                raise ArtifactError(f"{path}: field graphs.{kind}.file names {graph.file!r}, which files does not "
                                    f"list: rebuild the artifact")
            # the positions and tokens it was built for, from its own tables
            check_graph_tables(directory / graph.file, manifest.max_seq, manifest.dims.vocab_size,
                               fused=manifest.graph_format == ONNXRUNTIME)
        for name in TOKENIZER_FILES:
            manifest.listed_file(directory, name)
        return manifest

    def listed_file(self, directory: str | Path, name: str) -> Path | None:
        """The path of ``name`` when the manifest lists it (inside the artifact), None when it neither lists it
        nor is it there. A file that is there but not listed is an ArtifactError: the loader reads only what the
        manifest lists (and checks), so a file dropped into the artifact is refused rather than used or ignored."""
        directory = Path(directory)
        if name in self.files:
            return artifact_file(directory, name)
        path = directory / name
        if present(path):
            raise ArtifactError(f"{path} is in the artifact but {MANIFEST} does not list it: remove it, or rebuild "
                                f"the artifact with `medusa-export build`")
        return None

    def write(self, directory: str | Path) -> Path:
        """Write ``manifest.json`` atomically (a reader never sees half of it)."""
        out = Path(directory) / MANIFEST
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        tmp.replace(out)
        return out


def check_finished(directory: Path) -> None:
    """ArtifactError when ``directory`` is a build's work directory, unless this process is building it (and loads
    it to check its graphs)."""
    if os.path.lexists(directory / UNFINISHED) and str(directory.resolve()) not in _BUILDING:
        raise ArtifactError(f"{directory} is an unfinished build (in progress in another process, or stopped before "
                            f"the end): use the artifact a finished build writes; remove this directory if no build "
                            f"runs")


def building(directory: Path, now: bool) -> None:
    """Note that this process is (``now``) or is no longer building the work directory ``directory``."""
    key = str(Path(directory).resolve())
    _BUILDING.add(key) if now else _BUILDING.discard(key)


def listed_files(directory: str | Path) -> set[str] | None:
    """The files an artifact directory's manifest lists (with ``manifest.json``) — of any format version, so that
    `build --out` can replace an artifact an older medusa-export wrote; None when there is no manifest of ours."""
    data = json_object_or_none(Path(directory) / MANIFEST)
    if data is None or data.get("format") != FORMAT or not isinstance(data.get("files", {}), dict):
        return None
    return {str(name) for name in data.get("files", {})} | {MANIFEST}


def file_record(path: Path) -> FileRecord:
    return FileRecord(sha256_file(path), path.stat().st_size)


def graph_dtype(weights: str) -> str:
    """The graphs' float dtype (and the KV cache's) for a `build --dtype`."""
    return _DTYPE_OF[weights]


def kv_layout_of(graph_format: str) -> str:
    return _KV_LAYOUT_OF[graph_format]
