"""Whether a model directory is what its config.json says, checked before and after transformers loads it: a
supported architecture with sizes within far bounds and rotary settings a graph can follow, no more layers than the
weights hold, every described tensor present with its shape and finite, and files the loaders read that are regular
files. transformers itself fills a missing or mis-shaped tensor with random values and reports it in many lines.

    cfg = check_architecture(directory / "config.json")     # ModelError naming the file and the fix
    check_regular_files(directory)                           # the files read, an index's shards too, before loading
    check_layers_match_weights(directory, cfg)               # from the safetensors headers, before loading
    check_loaded(model, loading_info, directory)             # after from_pretrained(output_loading_info=True)
    check_length_effects(model.config, max_seq)              # once the build's context is known
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from medusa_export.exporter.train_out_dir import HEADS_FORMAT
from medusa_export.runtime.artifact_files import relative_inside
from medusa_export.runtime.bounded_read import read_bounded
from medusa_export.runtime.errors import ModelError
from medusa_export.runtime.manifest import DIMS_LIMITS
from medusa_export.runtime.typed_json import MAX_JSON_BYTES, json_object_or_none

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# config.json's sizes, far above any model this exports: the manifest's bounds where it records the size (an artifact
# past one would not load), far ones for the rest
SIZE_LIMITS = {"num_hidden_layers": DIMS_LIMITS["num_layers"], "vocab_size": DIMS_LIMITS["vocab_size"],
               "hidden_size": 1 << 16, "intermediate_size": 1 << 20, "num_attention_heads": 1024,
               "num_key_value_heads": DIMS_LIMITS["num_kv_heads"], "head_dim": DIMS_LIMITS["head_dim"]}


def check_architecture(config_file: Path) -> dict:
    """config.json as a dict, or a ModelError: a supported architecture, sizes within `SIZE_LIMITS`, rotary settings
    the graphs follow."""
    if not config_file.exists():
        artifact = (config_file.parent / "manifest.json").exists()
        raise ModelError(f"{config_file} is missing: a model directory needs config.json and safetensors weights"
                         + (f" ({config_file.parent} is an artifact: give the model it was built from)" if artifact
                            else " (and an artifact directory a manifest.json, which is not there either)"))
    try:  # bounded, a regular file only: a FIFO would block the build, /dev/zero fill the memory
        cfg = json.loads(read_bounded(config_file, MAX_JSON_BYTES).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        why = getattr(e, "strerror", None) or getattr(e, "msg", None) or type(e).__name__
        raise ModelError(f"{config_file} cannot be read as JSON ({why}): restore the model's config.json") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{config_file} must hold a JSON object, not {type(cfg).__name__}: restore the model's "
                         f"config.json")
    if cfg.get("format") == HEADS_FORMAT:  # said "model type None is not supported"
        raise ModelError(f"{config_file.parent} holds Medusa heads, not a model: give the base model as MODEL and "
                         f"this directory as --heads")
    check_config(cfg, config_file)
    return cfg


def check_config(cfg: dict, config_file: Path) -> None:
    """ModelError unless ``cfg`` (a config.json's content, or a GGUF's settings as transformers reads them, named by
    ``config_file``) describes a supported architecture of sizes within `SIZE_LIMITS`, before anything is
    allocated."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"model type {model_type!r} is not supported: supported types are {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    _check_rope(cfg, config_file)
    for name, most in SIZE_LIMITS.items():  # before transformers allocates what they describe
        value = cfg.get(name)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= most):
            shown = f"an integer of {len(str(value))} digits" if isinstance(value, int) and abs(value) > 10**12 \
                else repr(value)[:40]
            raise ModelError(f"{config_file}: {name} must be an integer in 1..{most}, not {shown}: restore the "
                             f"model's config.json")
    _check_head_split(cfg, config_file)
    window = sliding_window(cfg)
    if window is not None and not (isinstance(window, int) and not isinstance(window, bool) and window >= 1):
        raise ModelError(f"{config_file}: sliding_window must be a positive integer or null, not {window!r:.40}: "
                         f"restore the model's config.json")
    _check_sliding_layers(cfg, config_file)
    eps = cfg.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:  # ONNX Runtime's norm failed
        raise ModelError(f"{config_file}: rms_norm_eps must be a number in (0, 1), not {eps!r:.40}: restore the "
                         f"model's config.json")


def _check_head_split(cfg: dict, config_file: Path) -> None:
    """ModelError unless the attention heads share the KV heads evenly and, without an explicit ``head_dim``, split
    ``hidden_size`` evenly (transformers loads both, and the export failed with a RuntimeError traceback)."""
    heads, kv, hidden = (cfg.get(k) for k in ("num_attention_heads", "num_key_value_heads", "hidden_size"))
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise ModelError(f"{config_file}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}, "
                         f"so the heads cannot share the KV heads evenly: restore the model's config.json")
    if cfg.get("head_dim") is None and isinstance(heads, int) and isinstance(hidden, int) and hidden % heads:
        raise ModelError(f"{config_file}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} (and "
                         f"no head_dim is given): restore the model's config.json")


def sliding_window(cfg) -> object:
    """The attention window some layer of the model applies, as transformers reads ``cfg`` (config.json's dict or a
    loaded config), or None where every layer attends to the whole context. Qwen-style configs apply their window
    only with ``use_sliding_window`` and then to the layers from ``max_window_layers`` on (``layer_types`` says
    which, once loaded); Mistral to every layer; other types wherever ``layer_types`` does not rule it out
    (transformers' cache keeps a window's rows for them too). Not checked to be a number here (`check_config`)."""
    get = cfg.get if isinstance(cfg, dict) else (lambda name: getattr(cfg, name, None))
    qwen_style = get("model_type") in ("qwen2", "qwen3")  # the others' classes ignore use_sliding_window
    window = get("sliding_window")
    if window is None or (qwen_style and not get("use_sliding_window")):
        return None
    layer_types = get("layer_types")
    if get("model_type") != "mistral" and isinstance(layer_types, list):
        return window if "sliding_attention" in layer_types else None
    if qwen_style:  # config.json without layer_types: transformers derives them from max_window_layers
        first, layers = get("max_window_layers"), get("num_hidden_layers")
        first, layers = (first if isinstance(first, int) else 28), (layers if isinstance(layers, int) else 32)
        return window if first < layers else None
    return window


def _check_sliding_layers(cfg: dict, config_file: Path) -> None:
    """ModelError for a Qwen-style config whose ``layer_types`` name sliding layers without a window in use
    (``use_sliding_window`` false, which drops ``sliding_window``, or no ``sliding_window``): transformers cannot run
    it (the layers' mask and cache want a window), and the graphs, which take their mask as an input, built it as
    full attention."""
    layer_types = cfg.get("layer_types")
    if cfg.get("model_type") not in ("qwen2", "qwen3") or not isinstance(layer_types, list) \
            or "sliding_attention" not in layer_types:
        return
    if cfg.get("use_sliding_window") and cfg.get("sliding_window") is not None:
        return
    why = "sliding_window is null" if cfg.get("use_sliding_window") else "use_sliding_window is false"
    raise ModelError(f"{config_file}: layer_types names sliding_attention layers, but {why}, so transformers cannot "
                     f"run the model (its sliding layers need a window): restore the model's config.json")


def check_length_effects(cfg, max_seq: int) -> None:
    """ModelError when something the model does from a length on would take effect within ``max_seq`` positions.
    A sliding window: the graphs and the PyTorch
    reference (`StepModel`, whose cache layers are all full ones) attend to the whole context, so only a window longer
    than every sequence the build holds gives the model's own results (transformers' sliding-window cache, which
    keeps only ``window - 1`` rows, made a step reaching the window return too few). Dynamic RoPE scaling
    (`check_dynamic_rope`). Every build and backend calls this."""
    check_dynamic_rope(cfg, max_seq)
    window = sliding_window(cfg)
    if isinstance(window, int) and window <= max_seq:
        fix = f"build with --max-seq {window - 1} or less, where the window never takes effect" \
            if window > MIN_MAX_SEQ else f"a window under {MIN_MAX_SEQ + 1} tokens cannot be exported"
        raise ModelError(f"the model attends within a sliding window of {window} tokens, which the graphs do not "
                         f"implement (they attend to the whole context): {fix}")


MIN_MAX_SEQ = 16  # the smallest --max-seq a build takes (BuildOptions)


def check_dynamic_rope(cfg, max_seq: int) -> None:
    """ModelError when dynamic (NTK) RoPE scaling would take effect within the positions a ``max_seq`` build holds.
    transformers keeps the default frequencies while the positions stay within ``max_position_embeddings``
    (``dynamic_rope_update`` recomputes them from the length past it), so such a build is default RoPE exactly, which
    the graphs' fixed position tables hold. The fused graph's table has one row past ``max_seq`` (`fused_backbone`),
    which must stay within too: computed past it, the whole table was scaled. ``cfg``: a dict or loaded config."""
    get = cfg.get if isinstance(cfg, dict) else (lambda name: getattr(cfg, name, None))
    settings = rope_settings(cfg if isinstance(cfg, dict) else {"rope_parameters": get("rope_parameters")})
    positions = get("max_position_embeddings")
    if not any(rope_kind(p) == "dynamic" for p in settings) or (isinstance(positions, int) and max_seq < positions):
        return
    most = positions - 1 if isinstance(positions, int) else 0
    fix = f"build with --max-seq {most} or less, not {max_seq}" if most >= MIN_MAX_SEQ \
        else f"a model of under {MIN_MAX_SEQ + 1} positions cannot be exported with it"
    raise ModelError(f"config.json: dynamic RoPE scaling is not supported past the model's max_position_embeddings "
                     f"{positions}, where its frequencies start changing with the sequence's length (the graphs' "
                     f"position tables, one row past --max-seq, are fixed): {fix}")


def rope_kind(params: dict) -> object:
    """A RoPE parameter dict's type, under either of the names transformers reads."""
    return params.get("rope_type", params.get("type", "default"))


def fp32_bytes(cfg: dict) -> int:
    """About what the model's weights take in fp32, from the sizes its settings give (transformers' defaults for the
    ones they leave out)."""
    hidden, layers = cfg.get("hidden_size", 4096), cfg.get("num_hidden_layers", 32)
    heads = cfg.get("num_attention_heads", 32)
    head_dim = cfg.get("head_dim") or hidden // max(heads, 1)
    kv = cfg.get("num_key_value_heads") or heads
    attention = hidden * head_dim * (2 * heads + 2 * kv)  # q and o, k and v
    mlp = 3 * hidden * cfg.get("intermediate_size", 11008)
    embeddings = cfg.get("vocab_size", 32000) * hidden * (1 if cfg.get("tie_word_embeddings") else 2)
    return 4 * (layers * (attention + mlp) + embeddings)


def check_fits_memory(cfg: dict, where: Path) -> None:
    """ModelError before loading a model whose fp32 weights alone exceed the memory free here: the kernel's
    out-of-memory killer ended the process instead (a GGUF naming only its architecture got a 6.7 B default)."""
    from medusa_export.runtime.machine import available_ram

    need, free = fp32_bytes(cfg), available_ram(swap=True)  # slow with swap, but it loads
    if free is not None and need > free:
        raise ModelError(f"{where}: the model's weights take about {need / 2**30:.1f} GiB in fp32, more than the "
                         f"{free / 2**30:.1f} GiB free here (memory and swap): use a smaller model, or a machine "
                         f"with more memory")


def rope_settings(cfg: dict) -> list[dict]:
    """The RoPE parameter dicts transformers reads from config.json's ``cfg`` (one, or one per layer type where they
    are nested): a non-empty ``rope_scaling`` (the older name) wins over ``rope_parameters``, as transformers 5 merges
    them (reading ``rope_parameters`` first let a dynamic ``rope_scaling`` past the checks)."""
    scaling, params = cfg.get("rope_scaling"), cfg.get("rope_parameters")
    chosen = scaling if isinstance(scaling, dict) and scaling else params
    chosen = chosen if isinstance(chosen, dict) else {}
    nested = [v for v in chosen.values() if isinstance(v, dict)]
    dicts = nested if nested and all(isinstance(v, dict) or v is None for v in chosen.values()) else [chosen]
    return dicts


def _check_rope(cfg: dict, config_file: Path) -> None:
    """Rotary settings a graph with fixed position tables can follow (the export's check blamed the exporter)."""
    positions = cfg.get("max_position_embeddings")
    if positions is not None and (not isinstance(positions, int) or isinstance(positions, bool) or positions < 1):
        raise ModelError(f"{config_file}: max_position_embeddings must be a positive integer, not "
                         f"{positions!r:.40}: restore the model's config.json")
    for params in rope_settings(cfg):  # the dict's own rope_theta wins over the top-level one, as in transformers
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        _check_rope_params(params, theta, cfg.get("partial_rotary_factor"), config_file)


def _is_positive(value: object) -> bool:
    """Whether ``value`` is a finite positive number (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")


def _check_rope_params(params: dict, theta: object, partial: object, config_file: Path) -> None:
    """ModelError unless one RoPE parameter dict (``theta`` its base, ``partial`` config.json's top-level
    ``partial_rotary_factor``) gives fixed frequencies that rotate whole heads."""
    if not _is_positive(theta):
        raise ModelError(f"{config_file}: rope_theta must be a positive number, not {theta!r:.40}: restore the "
                         f"model's config.json")
    factor = params.get("factor")
    if factor is not None and not _is_positive(factor):
        raise ModelError(f"{config_file}: the RoPE scaling factor must be a positive number, not {factor!r:.40}: "
                         f"restore the model's config.json")
    kind = rope_kind(params)
    if kind == "longrope":  # switches at the trained length: a graph built past it differed
        raise ModelError(f"{config_file}: {kind} RoPE scaling is not supported: its frequencies change with the "
                         f"sequence's length, which the graphs' fixed position tables cannot follow; use a model "
                         f"with RoPE scaling of type {', '.join(ROPE_TYPES)} (or dynamic)")
    if kind not in (*ROPE_TYPES, "dynamic"):  # transformers failed with a KeyError naming only the type
        raise ModelError(f"{config_file}: RoPE type {kind!r:.40} is not supported: use a model with RoPE scaling of "
                         f"type {', '.join(ROPE_TYPES)} or dynamic")
    partial = params.get("partial_rotary_factor", partial)
    if kind in PARTIAL_ROPE_TYPES or partial is None or partial == 1:
        return
    raise ModelError(f"{config_file}: partial_rotary_factor {partial!r:.40} with {kind} RoPE is not supported: "
                     f"transformers computes this type's frequencies for part of each head but rotates the whole "
                     f"head, so the model does not run (in PyTorch either); use RoPE type default or proportional, "
                     f"or partial_rotary_factor 1.0")


# RoPE types whose frequencies cover the whole head whatever partial_rotary_factor says: "default" (the Llama family
# ignores the factor) and "proportional" (zero frequencies past the rotated part)
PARTIAL_ROPE_TYPES = ("default", "proportional")


# RoPE types whose frequencies are fixed, so the graphs' position tables (from the model's own rotary module) hold
# them exactly; each builds and passes the export's check against PyTorch
ROPE_TYPES = ("default", "linear", "yarn", "llama3", "proportional")


def check_layers_match_weights(directory: Path, cfg: dict) -> None:
    """ModelError when config.json describes another number of decoder layers than the safetensors hold: transformers
    fills layers without weights with random ones (and a config of 100M layers allocates them first)."""
    layers: set[int] = set()
    files = _weight_files(directory)
    for file in files:
        layers |= {int(m.group(1)) for key in _safetensors_keys(file) if (m := _LAYER_KEY.search(key))}
    want = cfg.get("num_hidden_layers")
    # More layers than the weights hold is refused; fewer load (the first layers: a quick test of a big model)
    if files and layers and isinstance(want, int) and want > max(layers) + 1:
        raise ModelError(f"{directory / 'config.json'} says num_hidden_layers {want}, but the weights hold "
                         f"{max(layers) + 1} layers: restore the config.json that belongs to these weights")


_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files transformers loads: the index's shards (in subfolders too), else model.safetensors."""
    shards = index_shards(directory, SAFETENSORS_INDEX)
    if shards is not None:
        return shards
    return [directory / "model.safetensors"] if (directory / "model.safetensors").is_file() else []


SAFETENSORS_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"


def index_shards(directory: Path, index: str) -> list[Path] | None:
    """The shard files the weight index ``index`` in ``directory`` lists (None without a readable index): ModelError
    for a name that is not a relative path inside the directory (transformers joins it to the directory, so
    "/etc/x" or "../x" read a file elsewhere). A symlink is followed, as the model's own files are (a Hugging Face
    cache links them into its blobs folder)."""
    content = json_object_or_none(directory / index)
    names = content.get("weight_map") if content else None
    if not isinstance(names, dict):
        return None
    return sorted({_shard_path(directory, index, name) for name in names.values()})


def _shard_path(directory: Path, index: str, name: object) -> Path:
    """``directory / name`` for a shard ``index`` names, or ModelError unless ``name`` stays inside ``directory``."""
    text = name if isinstance(name, str) else ""
    if not (relative_inside(text) and text.isprintable()):
        raise ModelError(f"{directory / index} names the shard {name!r:.120}, which is not a path inside "
                         f"{directory}: refusing to read it; restore the model's index file")
    return directory / text


def _safetensors_keys(file: Path) -> list[str]:
    """The tensor names in a safetensors file's header, read without the tensors (unreadable or not a regular file:
    none; the loader then says what is wrong with the file)."""
    try:
        if not file.is_file():  # a FIFO would block the open
            return []
        with file.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 0 < size <= MAX_JSON_BYTES * 8 else {}
    except (OSError, ValueError, RecursionError):
        return []
    return [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []


def check_regular_files(directory: Path) -> None:
    """ModelError for a file the loaders read (weights, JSON, tokenizer files, the shards a weight index lists, in
    subfolders too) that is not a regular file: a FIFO blocked the build for ever, a device filled the memory, a
    directory failed with "Is a directory"."""
    for path in sorted(directory.iterdir()):
        if path.suffix in _READ_SUFFIXES and not path.is_file():
            raise ModelError(f"{path} is not a regular file (a directory, FIFO, device or broken link), where the "
                             f"model's files are read: remove or restore it")
    for index in (SAFETENSORS_INDEX, BIN_INDEX):
        for shard in index_shards(directory, index) or ():
            if not _is_regular(shard):  # stat only: opening a FIFO would wait for a writer
                raise ModelError(f"{shard}, a shard {index} lists, is missing or not a regular file (a directory, "
                                 f"FIFO, device or broken link): restore the model's weights")


def _is_regular(path: Path) -> bool:
    """Whether ``path`` is a regular file (through symlinks); False where the system cannot say (a name too long,
    no permission), which ``is_file`` raises as OSError."""
    try:
        return path.is_file()
    except OSError:
        return False


_READ_SUFFIXES = {".json", ".safetensors", ".bin", ".jinja", ".model", ".txt", ".gguf"}


def check_loaded(model, info: dict, directory: Path, settings: str = "config.json") -> None:
    """ModelError for weights the model lacks, of another shape, or not numbers: transformers initialises missing
    and mis-shaped ones randomly (with a report of many lines), and NaN weights failed only at the export's check,
    blamed on the exporter. ``settings``: what describes the weights (config.json, or a GGUF's own settings)."""
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(info.get("missing_keys", ())) - tied)
    if missing:
        raise ModelError(f"the weights in {directory} lack {len(missing)} tensor(s) {settings} describes (such as "
                         f"{missing[0]!r}): {settings} does not describe these weights; restore the model's files")
    mismatched = sorted(info.get("mismatched_keys", ()))
    if mismatched:
        key, have, want = mismatched[0][:3]
        raise ModelError(f"the weights in {directory} hold {key!r} of shape {tuple(have)}, but {settings} needs "
                         f"{tuple(want)}: {settings} does not describe these weights; restore the model's files")
    import torch

    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelError(f"the model's weight {name!r} holds NaN or infinite values: restore the weights "
                             f"({directory})")
