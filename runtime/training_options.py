"""The knobs of a training run, defined once: ``train-heads`` takes its defaults from here and the trainers
take these objects. Light on purpose (no torch): the CLI imports it to build its options.

    medusa1 = Medusa1Options(epochs=2, draft_vocab=8192)   # a bad value raises InputError naming the CLI flag
    train_heads(None, "train_prompts.jsonl", "heads/x", medusa1)
    train_medusa2(None, "sharegpt", "models/x", medusa1, Medusa2Options(lm_weight=2.5))

Values are checked once, on construction, so a bad flag is refused before any model is loaded. What needs the
model or the heads (LoRA targets that exist, one ``--head-lrs`` rate per head) is checked by the trainer.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import InputError

DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
MAX_HEADS, MAX_HEAD_LAYERS = 64, 16  # what a heads directory may hold (exporter/heads.py reads it back)
# Upper bounds checked before any model loads: beyond them a run failed after hours of distillation, or inside
# torch or numpy (a seed outside their range, a tensor of terabytes)
UPPER_BOUNDS = {"num_heads": MAX_HEADS, "num_layers": MAX_HEAD_LAYERS, "seed": 2 ** 63 - 1, "max_new_tokens": 1 << 15,
                "threads": 4096, "gen_batch_size": 4096, "batch_size": 1 << 20, "draft_vocab": 1 << 24,
                "epochs": 10_000, "extra_sampled_passes": 1000}
MAX_LR = 10.0  # a rate beyond this overflows AdamW's update (1e38: inf weights, then a traceback inside torch)


@dataclass(frozen=True)
class Medusa1Options:
    """Medusa-1: heads on the frozen backbone. Under ``--mode medusa2`` these drive the heads warm-up
    (``epochs``, ``lr``: its epochs and the heads' rate) and the data both phases share."""

    num_heads: int = 4
    num_layers: int = 1  # residual blocks per head
    epochs: int = 3
    lr: float = 1e-3  # the heads' learning rate (AdamW, linear warm-up, cosine decay)
    batch_size: int = 256  # positions per step (per rank under torchrun)
    seed: int = 0  # the split, the shuffles, the initialisation and the sampled answers
    max_new_tokens: int = 256  # self-distilled answer length per prompt
    heldout_fraction: float = 0.05  # prompts held out for the accuracy table and calibrate-tree
    draft_vocab: int | None = None  # score only the N most frequent target tokens (None: the full vocabulary)
    resume: bool = True  # reuse cached shards and continue from a checkpoint of the same run
    progress: bool = True  # tqdm bars on stderr
    gen_batch_size: int = 64  # prompts generated together (cache slots, refilled as answers end)
    temperature: float = 0.0  # pass 0 (the held-out answers too): 0 = greedy
    cache_dir: str | Path | None = None  # self-distilled shards (default $MEDUSA_EXPORT_CACHE/distill)
    amp: str = "auto"  # vocabulary projection: auto | bf16 | none (fp32)
    weight_decay: float = 0.0
    warmup_fraction: float = 0.03  # share of the steps spent warming the rate up
    threads: int | None = None  # torch intra-op threads (None: torch's choice)
    checkpoint_every_s: float = 300.0  # seconds between checkpoints within an epoch
    max_train_positions: int | None = None  # a seeded random subset of the training positions
    extra_sampled_passes: int = 0  # more answers per prompt, sampled, for training only
    sample_temperature: float = 0.7  # temperature of the extra sampled passes
    exclude_eval: str | Path | None = None  # evaluation prompts kept out of training (None: MT-Bench)
    later_turns: bool = False  # sharegpt: later human turns as prompts of their own too
    device: str = "auto"  # auto | cpu | cuda
    distill_engine: str = "auto"  # auto | static (preallocated KV cache, continuous batching) | hf

    def __post_init__(self) -> None:
        _check_types(self)
        _at_least(self, 1, "num_heads", "num_layers", "epochs", "batch_size", "gen_batch_size", "threads",
                  "max_train_positions")
        _at_least(self, 2, "max_new_tokens", "draft_vocab")
        _at_least(self, 0, "temperature", "sample_temperature", "extra_sampled_passes", "weight_decay",
                  "checkpoint_every_s", "seed")
        for name, high in UPPER_BOUNDS.items():
            _at_most(self, high, name)
        _positive(self, "lr")
        _at_most(self, MAX_LR, "lr")
        if not 0 <= self.heldout_fraction < 1:
            raise InputError(f"--heldout-fraction {self.heldout_fraction} must be in [0, 1)")
        if not 0 <= self.warmup_fraction <= 1:
            raise InputError(f"--warmup-fraction {self.warmup_fraction} must be in [0, 1]")
        _one_of(self, "amp", ("auto", "bf16", "none"))
        _one_of(self, "device", ("auto", "cpu", "cuda"))
        _one_of(self, "distill_engine", ("auto", "static", "hf"))


@dataclass(frozen=True)
class Medusa2Options:
    """Medusa-2's own knobs: the joint phase (backbone and heads). The warm-up is ``Medusa1Options``'."""

    init_heads: str | None = None  # start from these heads instead of a Medusa-1 warm-up
    joint_epochs: int = 1
    lora_rank: int = 16  # 0: full fine-tuning of the decoder layers
    lora_alpha: int = 32
    lora_targets: str = DEFAULT_LORA_TARGETS  # comma-separated linear layers to adapt
    backbone_lr: float = 2e-4  # the heads' rate is Medusa1Options.lr
    head_lrs: str | None = None  # the joint phase's rate per head, comma-separated (default: lr for each)
    lm_weight: float = 5.0  # weight of KL(original || fine-tuned); 5 kept the default model at 97 % agreement
    heads_weight: float = 0.2  # weight of the Medusa loss in the joint phase (the paper's lambda_0)
    seq_batch_size: int = 8  # sequences per joint step, at most
    max_batch_tokens: int = 4096  # padded tokens per joint step, at most (activations for backward grow with it)
    max_train_sequences: int | None = None  # a seeded random subset (shards are in prompt-length order)
    max_heldout_sequences: int | None = None  # the same for the held-out evaluation (its cost: 3 forwards each)

    def __post_init__(self) -> None:
        _check_types(self)
        if self.init_heads is not None and not self.init_heads.strip():  # read as unset: a warm-up ran instead
            raise InputError("--init-heads is empty: give a heads directory, or leave it out for a Medusa-1 warm-up")
        _at_least(self, 1, "joint_epochs", "seq_batch_size", "max_batch_tokens", "max_train_sequences",
                  "max_heldout_sequences")
        if self.lora_rank < 0:
            raise InputError(f"--lora-rank {self.lora_rank}: the LoRA rank must be >= 0 (0: full fine-tuning)")
        if self.lora_rank > 0:
            _positive(self, "lora_alpha")
        _positive(self, "backbone_lr", "heads_weight")
        _at_most(self, MAX_LR, "backbone_lr")
        _at_least(self, 0, "lm_weight")
        if not all(t.strip() and t.strip() == t for t in self.lora_targets.split(",")):
            raise InputError(f"--lora-targets {self.lora_targets!r}: give layer names, comma-separated, no spaces "
                             "(e.g. q_proj,v_proj)")
        _rates(self.head_lrs)

    def head_rates(self, num_heads: int) -> list[float] | None:
        """``head_lrs`` as numbers, one per head (None: one rate for all heads)."""
        rates = _rates(self.head_lrs)
        if rates is not None and len(rates) != num_heads:
            raise InputError(f"--head-lrs {self.head_lrs!r}: give {num_heads} positive rates, comma-separated "
                             "(one per head)")
        return rates

    @classmethod
    def from_record(cls, options: dict[str, Any]) -> Medusa2Options:
        """From a training.json's ``options`` (which also records the warm-up's epochs and heads' rate)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names})


# What each annotation admits. Checked first: a string or a bool reached a comparison (TypeError) or torch
# (AttributeError), and a float epoch count ran range() into a TypeError after distillation.
_KINDS = {"int": ("a whole number", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)),
          "float": ("a number", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)),
          "bool": ("true or false", lambda v: isinstance(v, bool)),
          "str": ("text", lambda v: isinstance(v, str)),
          "Path": ("a path", lambda v: isinstance(v, Path)),
          "None": ("unset", lambda v: v is None)}


def _check_types(opts: Any) -> None:
    """Every field of the annotated kind: InputError naming its flag otherwise."""
    for f in fields(opts):
        kinds = [k.strip() for k in str(f.type).split("|")]
        value = getattr(opts, f.name)
        if not any(_KINDS[k][1](value) for k in kinds):
            wanted = " or ".join(_KINDS[k][0] for k in kinds if k != "None")
            raise InputError(f"{_flag(f.name)} {str(value)[:24]!r}: give {wanted}")
        # one spelling per value (the checkpoint's resume key is their JSON: 0 and 0.0, or numpy's 3 and 3, differed)
        plain = float if "float" in kinds else int if "int" in kinds else None
        if plain is not None and isinstance(value, numbers.Real) and not isinstance(value, bool) \
                and type(value) is not plain:
            object.__setattr__(opts, f.name, plain(value))


def _at_most(opts: Any, high: int | float, *names: str) -> None:
    bound = f"{high:g}" if isinstance(high, float) else str(high)  # an integer bound in full: 1048576, not 1.04858e+06
    for name in names:
        value = getattr(opts, name)
        if value is not None and value > high:
            raise InputError(f"{_flag(name)} {str(value)[:24]} must be <= {bound}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _at_least(opts: Any, low: float, *names: str) -> None:
    """Each of ``names`` finite and >= ``low`` (None passes: the option is unset)."""
    for name in names:
        value = getattr(opts, name)
        if value is not None:
            _check_finite(name, value, f">= {low}")
            if value < low:
                raise InputError(f"{_flag(name)} {value} must be >= {low}")


def _positive(opts: Any, *names: str) -> None:
    for name in names:
        value = getattr(opts, name)
        _check_finite(name, value, "> 0")
        if not value > 0:
            raise InputError(f"{_flag(name)} {value} must be > 0")


def _check_finite(name: str, value: Any, bound: str) -> None:
    """inf and nan pass comparisons they should fail (nan < 0 is False): they trained NaN heads or failed deep
    inside torch after the model loaded."""
    try:
        finite = math.isfinite(value)
    except (TypeError, OverflowError):  # not a number (refused by the comparison after), or a huge int
        return
    if not finite:
        raise InputError(f"{_flag(name)} {value} is not a finite number: give a number {bound}")


def _one_of(opts: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(opts, name)
    if value not in choices:
        raise InputError(f"{_flag(name)} {value!r} must be one of {', '.join(choices)}")


def _rates(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        rates = [float(x) for x in text.split(",")]
    except ValueError:
        rates = []
    if not rates or not all(math.isfinite(r) and 0 < r <= MAX_LR for r in rates):
        raise InputError(f"--head-lrs {text!r}: give positive rates, finite and up to {MAX_LR:g}, comma-separated "
                         "(one per head)")
    return rates
