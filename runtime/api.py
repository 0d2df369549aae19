"""Library API for services: load an artifact once, then generate or stream, from any thread.

    from medusa_export.runtime import MedusaRuntime
    rt = MedusaRuntime.load("artifacts/smollm2", backend="ort", threads=2)
    result = rt.generate("Explain KV caches in one line.", max_new_tokens=64)
    for event in rt.stream("Tell me a story", temperature=0.7, seed=1):
        print(event.text, end="")
    results = rt.generate_many(["Hi!", "Name three colours."], max_new_tokens=32)   # batched, same answers
    with rt.batcher() as b:                                                       # services that batch themselves
        handle = b.submit("Explain KV caches.", max_new_tokens=64)

Each call gets its own session (KV buffers and I/O bindings); the loaded graph is shared. ``rt.notes``
holds what the user should be told (e.g. a TensorRT engine tuned on another GPU). ``rt.close()`` (or
``with MedusaRuntime.load(...) as rt:``) frees the graphs or engines and device memory at once.
"""

from __future__ import annotations

import os
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .corpus_drafts import FILE as CORPUS_FILE
from .corpus_drafts import CorpusTable
from .generation_config import GenerationConfig, request_config
from .engine import DEFAULT_MAX_NUM_BATCHED_TOKENS
from .errors import ArtifactError, InputError, TreeError
from .generator import GenerationResult, Generator, Stream
from .manifest import Manifest
from .tokenizer import ChatTokenizer
from .tree import Tree, given_choices


@dataclass
class MedusaRuntime:
    manifest: Manifest
    generator: Generator
    # The engine threads of the batchers it opened: a batcher dropped with requests still running is gone from
    # here only once its thread has stopped, so closing the runtime still stops it before the backend goes.
    _engine_threads: weakref.WeakSet = field(default_factory=weakref.WeakSet, repr=False)

    @classmethod
    def load(cls, directory: str | Path, backend: str = "ort", tree: str | None = None, device: str = "cpu",
             threads: int | None = None, max_seq: int | None = None, check_hashes: bool = False,
             model: str | None = None, plain: bool = False) -> "MedusaRuntime":
        """``check_hashes``: verify every file's sha256 (sizes are always checked). ``model``: the base model's
        directory or .gguf for the PyTorch reference backend, when this machine does not know where it is.
        ``plain``: the caller decodes without the heads, so on ONNX Runtime the vanilla graph opens at load instead
        of the Medusa one (each open graph holds its own weights; one opened later costs its first request ~1.7 s
        for the default model)."""
        if not isinstance(directory, (str, os.PathLike)):
            raise InputError(f"the artifact directory must be a path, not {type(directory).__name__}")
        threads, max_seq = _plain_int(threads), _plain_int(max_seq)
        if max_seq is not None and not (isinstance(max_seq, int) and not isinstance(max_seq, bool) and max_seq >= 1):
            raise InputError(f"max_seq must be an integer >= 1 (None: the artifact's), got {max_seq!r:.40}")
        check_device(device)
        if model is not None and backend != "torch":  # silently unused, it would look like it chose the model
            raise InputError(f"model is used by the torch backend only (the {backend!r} backend runs the artifact's "
                             f"own graphs): leave it out")
        for name, flag in (("plain", plain), ("check_hashes", check_hashes)):
            if not isinstance(flag, bool):  # "no" is truthy: it would check the hashes it asked not to
                raise InputError(f"{name} must be True or False, got {flag!r:.40}")
        if not str(directory).strip():
            raise InputError("the artifact directory is empty: give the directory `medusa-export build` wrote")
        for name, value in (("tree", tree), ("model", model)):
            if value is not None and not str(value).strip():  # an empty value must not stand for "the default"
                raise InputError(f"{name} (--{name}) is empty: give a value, or leave it out for the default")
        directory = Path(directory)
        manifest = Manifest.read(directory, check_hashes=check_hashes)
        if max_seq is not None and max_seq > manifest.max_seq:  # its KV buffers and graphs hold no more
            raise InputError(f"max_seq {max_seq} (--max-seq) is past the artifact's {manifest.max_seq}: leave it out "
                             f"for the artifact's, or rebuild with `medusa-export build --max-seq {max_seq}`")
        tokenizer = ChatTokenizer.from_artifact(directory, manifest)  # its ids checked against the vocabulary
        chosen_tree = artifact_tree(manifest, tree)
        options = {"model": model} if backend == "torch" else \
            {"first_graph": "vanilla"} if plain and backend == "ort" and "vanilla" in manifest.graphs else {}
        engine = open_backend(directory, manifest, backend, device=device, threads=threads, max_seq=max_seq, **options)
        generator = Generator(engine, tokenizer, chosen_tree)
        if manifest.drafts is not None:  # greedy speculation also drafts from the artifact's corpus table
            generator.spec.corpus = _corpus_table(directory, manifest)
        else:  # a table dropped into an artifact that has none is refused, not ignored (as every unlisted file)
            manifest.listed_file(directory, CORPUS_FILE)
        return cls(manifest, generator)

    @property
    def notes(self) -> tuple[str, ...]:
        return tuple(self.generator.backend.notes)

    def close(self) -> None:
        """Stop the batchers this runtime opened (their requests end as cancelled), then free the backend."""
        stopped = [thread.stop() for thread in list(self._engine_threads)]
        if all(stopped):  # else a step is still running on the backend: freeing it under that step would crash
            self.generator.backend.close()

    def __enter__(self) -> "MedusaRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompt: str | list[int], config: GenerationConfig | None = None, **options) -> GenerationResult:
        """``prompt`` decoded with a `GenerationConfig` or keyword options (its fields), not both."""
        return self.generator.generate(prompt, request_config(config, options))

    def stream(self, prompt: str | list[int], config: GenerationConfig | None = None, **options) -> Stream:
        return self.generator.stream(prompt, request_config(config, options))

    def generate_many(self, prompts: list[str | list[int]], max_num_seqs: int | None = None,
                      max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS, *,
                      config: GenerationConfig | None = None, **options) -> list[GenerationResult]:
        """Decode every prompt with continuous batching (the artifact's lanes graph). A greedy result is exactly
        what `generate` gives it alone, Medusa on or off. A sampled one (temperature > 0) decodes without the heads
        here (a batched step runs none), so with a seed it is the same whatever shares the batch, and equal to
        `generate(..., medusa=False)`, not to a speculating `generate`. Results in prompt order."""
        from .batcher import generate_many

        if isinstance(max_num_seqs, GenerationConfig):  # read as a batch size, it was named as a bad one
            raise InputError("generate_many's second argument is max_num_seqs: pass the options as config=... or "
                             "as keywords")
        cfg = request_config(config, options)
        return generate_many(self.generator, prompts, max_num_seqs, max_num_batched_tokens, cfg)

    def batcher(self, max_num_seqs: int | None = None, max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
                reuse_prefixes: bool = True):
        """A `Batcher`: submit requests from any thread, each decoded in the shared batch (`runtime.batcher`); a request
        starts from the KV rows a finished one left for their shared prefix unless ``reuse_prefixes`` is False."""
        from .batcher import Batcher

        if not isinstance(reuse_prefixes, bool):  # "no" is truthy
            raise InputError(f"reuse_prefixes must be True or False, got {reuse_prefixes!r:.40}")
        batcher = Batcher(self.generator, max_num_seqs, max_num_batched_tokens, reuse_prefixes)
        self._engine_threads.add(batcher.thread)  # stopped with the runtime: it must not outlive the backend
        return batcher

    def chat(self, messages: list[dict], config: GenerationConfig | None = None, **options) -> GenerationResult:
        """A conversation (``[{"role": ..., "content": ...}, ...]``) under the model's chat template. Message
        text is data: only the template's own markers become control tokens. A final assistant message is
        continued."""
        return self.generate(self.chat_ids(messages), config, **options)

    def stream_chat(self, messages: list[dict], config: GenerationConfig | None = None, **options) -> Stream:
        return self.stream(self.chat_ids(messages), config, **options)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        _check_messages(messages)
        return self.generator.tokenizer.encode_chat(messages, continue_final=messages[-1]["role"] == "assistant")


def _check_messages(messages) -> None:
    """InputError naming the first message that is not ``{"role": system|user|assistant, "content": str}``."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError(f"messages must be a non-empty list of {{\"role\": ..., \"content\": ...}} objects, got "
                         f"{'an empty list' if isinstance(messages, (list, tuple)) else type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InputError(f"messages[{i}] must be an object with role and content, got {type(m).__name__}")
        if m.get("role") not in ("system", "user", "assistant"):
            raise InputError(f"messages[{i}] has the role {m.get('role')!r:.40}: the roles are system, user and "
                             f"assistant (tool calls are not supported)")
        content = m.get("content")
        if isinstance(content, list):
            raise InputError(f"messages[{i}] content is a list of parts: give the text as one string")
        if not isinstance(content, str):
            raise InputError(f"messages[{i}] content must be a string, got {type(content).__name__}")
        extra = sorted(str(k) for k in m if k not in ("role", "content"))
        if extra:  # as the server: the template renders role and content only
            raise InputError(f"messages[{i}] has the field {extra[0][:80]!r}: only role and content are rendered; "
                             f"put names or other context in the content")


def _corpus_table(directory: Path, manifest: Manifest) -> CorpusTable:
    """The artifact's corpus-draft table, which must be the one its manifest describes."""
    record = manifest.drafts
    path = manifest.listed_file(directory, record.file)
    table = CorpusTable.load(path, manifest.dims.vocab_size, record.entries)
    if (table.max_ngram, table.entries) != (record.max_ngram, record.entries):
        raise ArtifactError(f"{path} holds {table.entries} entries of up to {table.max_ngram}-grams but the manifest "
                            f"records {record.entries} of up to {record.max_ngram}-grams: rebuild the artifact")
    return table


def artifact_tree(manifest: Manifest, spec: str | None) -> Tree | None:
    """The artifact's own tree, or another one that fits its graph (depth <= heads, rank < graph top-k). An artifact
    without heads verifies no tree: one given is refused rather than ignored."""
    dims = manifest.dims
    if not dims.num_heads:
        if spec is not None:
            raise TreeError(f"tree {spec!r:.200}: the artifact has no Medusa heads, so no tree is verified: leave the "
                            f"tree out, or build the artifact with heads (`medusa-export build --heads ...`)")
        return None
    choices = given_choices(spec) if spec is not None else manifest.tree.medusa_choices
    try:
        return Tree.from_choices(choices, topk=dims.head_topk, num_heads=dims.num_heads)
    except TreeError as e:
        raise TreeError(f"{e} (the exported graph has {dims.num_heads} heads with top-{dims.head_topk} each)") from None


def check_device(device) -> None:
    """InputError unless ``device`` names a device some backend runs on (the backend then says whether it does)."""
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise InputError(f"unknown device {device!r:.40}: choose cpu, cuda or cuda:N (mps, xpu: the torch backend)")


_DEVICE = re.compile(r"cpu|(cuda|xpu)(:[0-9]{1,4})?|mps")  # those PyTorch names (the torch backend takes them)


def _plain_int(value):
    """A numpy integer as the int it holds (as max_new_tokens and seed take them); anything else unchanged."""
    return int(value) if isinstance(value, np.integer) else value


def open_backend(directory: Path, manifest: Manifest, backend: str, **options):
    if backend == "ort":
        from .backends.ort import OrtBackend

        return OrtBackend(directory, manifest, **options)
    if backend == "trt":
        from .backends.trt import TrtBackend

        return TrtBackend(directory, manifest, **options)
    if backend == "torch":
        from medusa_export.exporter.artifact_reference import torch_backend_for_artifact

        return torch_backend_for_artifact(directory, manifest, **options)
    raise InputError(f"unknown backend {backend!r}: choose ort, trt or torch")
