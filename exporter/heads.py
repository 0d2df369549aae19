"""Medusa heads: K residual-block stacks on the last hidden state, each with a vocabulary projection.

    heads = MedusaHeads(HeadsConfig(hidden_size=576, vocab_size=49152, num_heads=4))
    logits = heads(hidden, base_lm_head)          # [B, T, K, V]
    save_heads(heads, "out/heads"); heads = load_heads("out/heads", base_config)

Layouts: ``shared`` reuses the base model's ``lm_head`` (0.3M parameters per head at hidden 576),
``own`` gives every head its own projection initialised from the base ``lm_head`` (Medusa-1 releases).
Checkpoints are safetensors + ``config.json``; the reference formats (``medusa_lm_head.pt``,
``medusa_lm_head.safetensors``) load too. Nothing is ever unpickled beyond plain tensors.
"""

from __future__ import annotations

import collections
import json
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from medusa_export.runtime.bounded_read import read_bounded
from medusa_export.runtime.errors import HeadsError, first_line
from medusa_export.runtime.whole_file import readable_as_made
# Far beyond any useful heads (Medusa uses 4-5 heads of one block): bounds checked before anything is allocated,
# and by train-heads before any work
from medusa_export.runtime.training_options import MAX_HEAD_LAYERS as MAX_LAYERS, MAX_HEADS
from medusa_export.runtime.typed_json import MAX_JSON_BYTES

from .tensor_pickles import PickledObjects, UnreadableTensors, load_tensors

HEADS_FORMAT = "medusa-export-heads"
HEADS_FORMAT_VERSION = 1
WEIGHTS_FILE = "heads.safetensors"


@dataclass
class HeadsConfig:
    hidden_size: int
    vocab_size: int
    num_heads: int = 4
    num_layers: int = 1
    layout: str = "shared"  # "shared" | "own"
    base_model: str = ""  # identity of the base model the heads were trained for
    # > 0: heads score only this many token ids (`draft_ids`, e.g. the most frequent ones), which cuts the
    # vocabulary projection (the heads' dominant cost) by vocab_size / draft_vocab_size.
    draft_vocab_size: int = 0

    def __post_init__(self) -> None:
        if self.layout not in ("shared", "own"):
            raise HeadsError(f"heads layout {self.layout!r:.40} is unknown: use 'shared' or 'own'")
        for name, lo, hi in (("hidden_size", 1, 1 << 20), ("vocab_size", 1, 1 << 24), ("num_heads", 1, MAX_HEADS),
                             ("num_layers", 1, MAX_LAYERS), ("draft_vocab_size", 0, self.vocab_size)):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi):
                raise HeadsError(f"heads {name} must be an integer in {lo}..{hi}, got {value!r:.40}: fix the heads' "
                                 f"config.json or re-run train-heads")
        if not isinstance(self.base_model, str):
            raise HeadsError(f"heads base_model must be a string, got {type(self.base_model).__name__}")


class ResBlock(nn.Module):
    """``h + SiLU(W h + b)`` with ``W`` zero-initialised (as in Medusa): a fresh head is ``h + SiLU(b)``,
    close to the base model's own prediction, which is where training starts from."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + nn.functional.silu(self.linear(h))


class MedusaHeads(nn.Module):
    def __init__(self, config: HeadsConfig) -> None:
        super().__init__()
        self.config = config
        # One fresh module per layer and head: `[ResBlock(h)] * n` would silently share weights.
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResBlock(config.hidden_size) for _ in range(config.num_layers)])
            for _ in range(config.num_heads)
        )
        out_vocab = config.draft_vocab_size or config.vocab_size
        self.proj = nn.ModuleList(
            nn.Linear(config.hidden_size, out_vocab, bias=False)
            for _ in range(config.num_heads if config.layout == "own" else 0)
        )
        if config.draft_vocab_size:
            self.register_buffer("draft_ids", torch.arange(config.draft_vocab_size, dtype=torch.long))
        else:
            self.draft_ids = None

    def init_projections_from(self, lm_head: nn.Linear) -> None:
        with torch.no_grad():
            for p in self.proj:
                p.weight.copy_(lm_head.weight if self.draft_ids is None else lm_head.weight[self.draft_ids])

    def to_token_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """Map indices into the heads' vocabulary (full or draft) to token ids."""
        return indices if self.draft_ids is None else self.draft_ids[indices]

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        """Per-head hidden states ``[..., K, H]`` (before the vocabulary projection)."""
        return torch.stack([blk(h) for blk in self.blocks], dim=-2)

    def forward(self, h: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """Logits ``[..., K, V]`` for hidden states ``[..., H]`` (V = draft_vocab_size when set: map
        indices with `to_token_ids`)."""
        hk = self.hidden(h)
        if self.config.layout == "shared":
            if self.draft_ids is None:
                return lm_head(hk)
            return nn.functional.linear(hk, lm_head.weight[self.draft_ids])
        return torch.stack([p(hk[..., k, :]) for k, p in enumerate(self.proj)], dim=-2)


def restrict_vocab(heads: MedusaHeads, token_ids: torch.Tensor, lm_head: nn.Module | None = None) -> MedusaHeads:
    """A copy of ``heads`` that scores only ``token_ids`` (e.g. the most frequent tokens of the training data)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).unique(sorted=True)
    cfg = HeadsConfig(**{**asdict(heads.config), "draft_vocab_size": int(ids.numel())})
    out = MedusaHeads(cfg)
    out.blocks.load_state_dict(heads.blocks.state_dict())
    out.draft_ids.copy_(ids)
    with torch.no_grad():
        for p_new, p_old in zip(out.proj, heads.proj):
            full = p_old.weight if heads.draft_ids is None else None
            if full is None:
                raise HeadsError("restrict_vocab needs heads with a full-vocabulary projection")
            p_new.weight.copy_(full[ids])
    return out


def new_heads(base_config, num_heads: int = 4, num_layers: int = 1, layout: str = "shared",
              lm_head: nn.Module | None = None, base_model: str = "") -> MedusaHeads:
    """Freshly initialised heads for a base model config (a transformers config)."""
    cfg = HeadsConfig(base_config.hidden_size, base_config.vocab_size, num_heads, num_layers, layout, base_model)
    heads = MedusaHeads(cfg)
    if layout == "own" and lm_head is not None:
        heads.init_projections_from(lm_head)
    return heads


def save_heads(heads: MedusaHeads, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write ``heads.safetensors`` + ``config.json``; returns the directory."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp))
    readable_as_made(tmp)
    tmp.replace(out / WEIGHTS_FILE)
    meta = {"format": HEADS_FORMAT, "format_version": HEADS_FORMAT_VERSION, **asdict(heads.config), **(extra or {})}
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_heads(path: str | Path, base_config) -> MedusaHeads:
    """Load our format or a reference format and check every key and shape against ``base_config``."""
    path = Path(path)
    if not path.exists():
        raise HeadsError(f"heads path {path} does not exist: pass a directory written by train-heads or a Medusa checkpoint")
    directory = path if path.is_dir() else path.parent
    cfg_file = directory / "config.json"
    _check_not_mid_move(directory, cfg_file)
    meta = read_heads_json(cfg_file) if cfg_file.exists() else {}
    if not cfg_file.exists() and (directory / WEIGHTS_FILE).exists():  # ours, without the config giving its shapes
        raise HeadsError(f"{directory} holds {WEIGHTS_FILE} but no config.json, which train-heads writes beside it: "
                         f"restore config.json, or train the heads again")
    if meta.get("format") == HEADS_FORMAT:
        cfg = heads_config(meta, cfg_file)
        state = read_tensors(directory / WEIGHTS_FILE)
    else:
        state, cfg = _read_reference(path, meta, base_config)
    return heads_from_state(state, cfg, base_config, path)


def _check_not_mid_move(directory: Path, cfg_file: Path) -> None:
    """HeadsError for heads whose train-heads run was stopped while it moved its finished files in: config.json goes
    last, so none is there yet and the rest would read as a reference checkpoint of mixed files."""
    from .train_out_dir import STAGE_DONE, TRAIN_STAGE

    if not cfg_file.exists() and (directory / TRAIN_STAGE / STAGE_DONE).is_file():
        raise HeadsError(f"heads {directory} are half moved into place by a train-heads run that was stopped: run "
                         f"train-heads again with the same --out to finish it")


def heads_config(meta: dict, cfg_file: Path) -> HeadsConfig:
    """Our heads' config.json as a HeadsConfig: every field present and typed (HeadsError naming the file)."""
    keys = ("hidden_size", "vocab_size", "num_heads", "num_layers", "layout")
    missing = [k for k in keys if k not in meta]
    if missing:
        raise HeadsError(f"{cfg_file} lacks the field {missing[0]!r}: re-run train-heads or restore the file")
    return HeadsConfig(**{k: meta[k] for k in keys}, base_model=meta.get("base_model", ""),
                       draft_vocab_size=meta.get("draft_vocab_size", 0))


def heads_from_state(state: dict[str, torch.Tensor], cfg: HeadsConfig, base_config, path: Path) -> MedusaHeads:
    """Heads with exactly these tensors (every key and shape checked against ``cfg`` and the base model, on the
    meta device first, so a config that does not describe the tensors allocates nothing)."""
    _check_against_base(cfg, base_config, path)
    with torch.device("meta"):
        expected = MedusaHeads(cfg).state_dict()
    _check_state(expected, state, path)
    _check_values(state, cfg.vocab_size, path)
    heads = MedusaHeads(cfg)
    heads.load_state_dict({k: t.to(v.dtype) for k, t in state.items() for v in [expected[k]]}, strict=True)
    return heads


def _read_reference(path: Path, meta: dict, base_config) -> tuple[dict, HeadsConfig]:
    """Reference layout: keys ``{head}.{layer}.linear.*`` and, with own projections, ``{head}.{L}.weight``."""
    directory = path if path.is_dir() else path.parent
    if path.is_file():
        weights = path
    else:
        candidates = [directory / "medusa_lm_head.safetensors", directory / "medusa_lm_head.pt"]
        weights = next((c for c in candidates if c.exists()), None)
        if weights is None:
            raise HeadsError(
                f"no heads weights in {directory}: expected {WEIGHTS_FILE}, medusa_lm_head.safetensors or medusa_lm_head.pt"
            )
    return reference_state(read_tensors(weights), meta, base_config, weights)


def _index(part: str) -> bool:
    """A head or layer number in a key: ASCII digits only (``str.isdigit`` takes "²", which ``int`` refuses)."""
    return part.isascii() and part.isdecimal() and len(part) <= 6


def reference_state(raw: dict[str, torch.Tensor], meta: dict, base_config, weights: Path) -> tuple[dict, HeadsConfig]:
    """Our state dict and config from reference-layout tensors (``medusa_head.`` prefix optional) and the
    Medusa settings of ``meta`` (``medusa_num_heads``, ``medusa_num_layers``; inferred from the keys if absent)."""
    raw = {k.removeprefix("medusa_head.").removeprefix("medusa."): v for k, v in raw.items()}
    for k in raw:  # every key first: sizes inferred from keys below read their first two parts as numbers
        parts = k.split(".")
        if len(parts) < 3 or not _index(parts[0]) or not _index(parts[1]):
            raise HeadsError(f"unexpected key {k[:120]!r} in {weights}: not a Medusa heads checkpoint")
    n_heads = meta.get("medusa_num_heads")
    n_layers = meta.get("medusa_num_layers")
    if n_heads is None or n_layers is None:
        # Infer from the keys when config.json lacks the fields.
        heads_seen = {int(k.split(".")[0]) for k in raw}
        layers_seen = {int(k.split(".")[1]) for k in raw if ".linear." in k}
        if not heads_seen or not layers_seen:
            raise HeadsError(f"{weights} has no keys like '0.0.linear.weight': not a Medusa heads checkpoint")
        n_heads = n_heads or max(heads_seen) + 1
        n_layers = n_layers or max(layers_seen) + 1
    own = f"0.{n_layers}.weight" in raw
    state = {}
    for k, v in raw.items():
        parts = k.split(".")
        h, layer = int(parts[0]), int(parts[1])
        if layer == n_layers and own:
            state[f"proj.{h}.{'.'.join(parts[2:])}"] = v
        else:
            state[f"blocks.{h}.{layer}.{'.'.join(parts[2:])}"] = v
    cfg = HeadsConfig(base_config.hidden_size, base_config.vocab_size, n_heads, n_layers,
                      "own" if own else "shared", str(meta.get("base_model_name_or_path", "")))
    return state, cfg


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a heads weights file (safetensors, or a PyTorch checkpoint of plain tensors): HeadsError for
    anything else."""
    _check_weights_file(file)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except Exception as e:  # a truncated or foreign file
            raise HeadsError(f"cannot read heads weights {file}: {type(e).__name__}: {first_line(e)}") from None
    try:  # plain tensors only, never arbitrary pickled objects
        obj = load_tensors(file)
    except PickledObjects:
        raise HeadsError(f"{file} holds pickled objects other than tensors, which are not loaded (they could run "
                         f"code): convert the checkpoint to safetensors") from None
    except UnreadableTensors:
        raise HeadsError(f"cannot read heads weights {file}: not a PyTorch checkpoint of tensors (corrupt or of "
                         f"another kind): re-save the heads") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise HeadsError(f"{file} is not a state dict of tensors")
    return obj


def _check_weights_file(file: Path) -> None:
    """HeadsError unless ``file`` is a regular file (a symlink to one too, as for the heads' config.json), found
    without opening it: the readers open by name, and opening a FIFO waited for a writer for ever."""
    try:
        mode = file.stat().st_mode
    except FileNotFoundError:  # a broken symlink too
        raise HeadsError(f"heads weights {file} are missing: re-run train-heads or copy the file") from None
    except OSError as e:  # a symlink loop, no permission
        raise HeadsError(f"cannot read heads weights {file} ({e.strerror or type(e).__name__}): restore the file or "
                         f"re-run train-heads") from None
    if not stat.S_ISREG(mode):
        raise HeadsError(f"heads weights {file} are not a regular file (a directory, FIFO or device): restore the "
                         f"file or re-run train-heads")


def read_heads_json(file: Path) -> dict:
    try:  # bounded, and a regular file only: a FIFO would block, /dev/zero fill the memory
        value = json.loads(read_bounded(file, MAX_JSON_BYTES).decode("utf-8"))
    except json.JSONDecodeError as e:
        raise HeadsError(f"{file} is not valid JSON ({e.msg}, line {e.lineno}): fix or re-save the heads") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        why = getattr(e, "strerror", None) or type(e).__name__
        raise HeadsError(f"{file} cannot be read as JSON text ({why}): fix or re-save the heads") from None
    if not isinstance(value, dict):
        raise HeadsError(f"{file} must hold a JSON object, not {type(value).__name__}: fix or re-save the heads")
    return value


def _check_against_base(cfg: HeadsConfig, base_config, path: Path) -> None:
    for name in ("hidden_size", "vocab_size"):
        mine, theirs = getattr(cfg, name), getattr(base_config, name)
        if mine != theirs:
            raise HeadsError(
                f"heads at {path} were made for {name}={mine} but the base model has {name}={theirs}: "
                f"use heads trained for this model (medusa-export train-heads)"
            )


def _check_values(state: dict[str, torch.Tensor], vocab_size: int, path: Path) -> None:
    """Weights that are numbers, and draft ids that are tokens: NaN heads exported "fine" and then failed the
    validation as a wrong export; negative draft ids built heads that could never propose a real token."""
    for k, t in state.items():
        if k == "draft_ids":
            check_draft_ids(t.tolist(), vocab_size, f"{path} ({k})")
        elif not t.is_floating_point():  # bool or int8 weights were cast to float silently
            raise HeadsError(f"heads tensor {k!r} at {path} holds {str(t.dtype).removeprefix('torch.')} values, not "
                             f"floating-point weights: train the heads again or restore the file")
        elif not bool(torch.isfinite(t).all()):
            raise HeadsError(f"heads tensor {k!r} at {path} holds NaN or infinite values: train the heads again or "
                             f"restore the file")


def check_draft_ids(ids, vocab_size: int, where: str) -> list[int]:
    """``ids`` if they are a draft vocabulary of the model: distinct token ids below ``vocab_size``."""
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise HeadsError(f"{where}: the draft vocabulary must be a non-empty list of token ids: train the heads again "
                         f"or remove it")
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        shown = bad if abs(bad) < 10 ** 12 else f"an integer of {len(str(abs(bad)))} digits"
        raise HeadsError(f"{where}: draft token id {shown} is outside the model's vocabulary (0..{vocab_size - 1}): "
                         f"these heads belong to another model; train them for this one")
    if len(set(ids)) != len(ids):
        twice = next(i for i, n in collections.Counter(ids).items() if n > 1)
        raise HeadsError(f"{where}: draft token id {twice} appears twice: train the heads again or remove it")
    return ids


def _check_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: Path) -> None:
    """Every expected key present with its exact shape, and nothing extra (never ``strict=False``)."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        raise HeadsError(f"heads at {path} lack tensor {missing[0]!r} (expected shape "
                         f"{tuple(expected[missing[0]].shape)}){NOT_THESE_HEADS}")
    if extra:
        raise HeadsError(f"heads at {path} have unexpected tensor {extra[0]!r}: the config does not describe these "
                         f"weights{NOT_THESE_HEADS}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise HeadsError(f"heads tensor {k!r} at {path} has shape {tuple(state[k].shape)}, the base model needs "
                             f"{tuple(v.shape)}{NOT_THESE_HEADS}")


# The fix for weights their config does not describe (damaged, edited, or another model's heads)
NOT_THESE_HEADS = (": train heads for this model (`medusa-export train-heads`), or rebuild the artifact they came "
                   "with")
