"""What ``medusa-export train-heads`` calls: one function taking the CLI's options, printing tqdm progress.

    run_train_heads(None, "train_prompts.jsonl", "heads/smollm2", epochs=3, draft_vocab=8192)

Also runnable directly (and under ``torchrun`` / ``accelerate launch``, see ``train.py``)::

    python -m medusa_export.exporter.training.cli_entry --data train_prompts.jsonl --out heads/x --epochs 3
"""

from __future__ import annotations

import argparse
import inspect
import os
import typing
from pathlib import Path
from typing import Any

from medusa_export.runtime.errors import InputError

from .train import train_heads

_INT_OR_NONE = ("draft_vocab", "threads", "max_train_positions")
# train-heads options that only --mode medusa2 reads (Medusa2Options fields)
_MEDUSA2_ONLY = ("init_heads", "joint_epochs", "lora_rank", "lora_alpha", "lora_targets", "backbone_lr",
                 "lm_weight", "heads_weight", "seq_batch_size", "max_train_sequences", "max_heldout_sequences",
                 "max_batch_tokens", "head_lrs", "heads_lr")


def run_train_heads(model: Any, data: str | Path, out: str | Path, mode: str = "medusa1", **options: Any) -> dict:
    """Train Medusa heads for ``model`` (path, None for the default model, or a loaded model) on ``data``.

    ``mode="medusa2"``: Medusa-2 (``medusa2.train_medusa2``); its own options (``Medusa2Options`` fields) go
    with the shared ones, ``epochs`` being the heads warm-up and ``lr`` the heads' rate."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if mode not in ("medusa1", "medusa2"):
        raise InputError(f"mode must be 'medusa1' or 'medusa2', got {mode!r}")
    if mode == "medusa2":
        return _run_medusa2(model, data, out, options)
    stray = sorted(k for k, v in options.items() if k in _MEDUSA2_ONLY and v is not None)
    if stray:
        raise InputError(f"{', '.join(stray)}: only for --mode medusa2")
    options = {k: v for k, v in options.items() if k not in _MEDUSA2_ONLY}
    known = set(inspect.signature(train_heads).parameters) - {"model_source", "data_file", "out_dir"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InputError(f"unknown train-heads option(s) {', '.join(unknown)}: known are {', '.join(sorted(known))}")
    return train_heads(model, data, out, **{k: v for k, v in options.items() if v is not None or k == "draft_vocab"})


def _run_medusa2(model: Any, data: str | Path, out: str | Path, options: dict) -> dict:
    from dataclasses import fields

    from .medusa2 import Medusa2Options, train_medusa2

    own = {f.name for f in fields(Medusa2Options)}
    chosen = {k: v for k, v in options.items() if k in own and v is not None}
    chosen.setdefault("warmup_epochs", options.get("epochs") or 1)  # Medusa-1's epochs and lr drive the warm-up
    chosen.setdefault("heads_lr", options.get("lr") or Medusa2Options.heads_lr)
    opts = Medusa2Options(**chosen)
    rest = {k: v for k, v in options.items() if k not in own and k not in ("epochs", "lr") and v is not None}
    for k in ("temperature", "extra_sampled_passes", "sample_temperature", "max_train_positions", "later_turns",
              "distill_engine"):
        rest.pop(k, None)  # Medusa-1-only knobs: the joint phase trains on the greedy answers
    return train_medusa2(model, data, out, opts, **rest)


def main(argv: list[str] | None = None) -> None:
    from dataclasses import fields

    from .medusa2 import Medusa2Options

    p = argparse.ArgumentParser(prog="train-heads", description="Train Medusa heads by self-distillation "
                                "(--mode medusa2: the backbone jointly, written as a model directory).")
    p.add_argument("--model", default=None, help="HF directory or .gguf; default: SmolLM2-135M-Instruct")
    p.add_argument("--data", required=True, help="'sharegpt' or a prompts JSONL, one {\"prompt\": ...} per line")
    p.add_argument("--out", required=True, help="output directory for the heads")
    p.add_argument("--mode", default="medusa1", choices=("medusa1", "medusa2"))
    sig = inspect.signature(train_heads)
    for name, par in sig.parameters.items():
        if name in ("model_source", "data_file", "out_dir") or par.default is inspect.Parameter.empty:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(par.default, bool):
            p.add_argument(flag, default=par.default, action=argparse.BooleanOptionalAction)
        elif name in _INT_OR_NONE:
            p.add_argument(flag, type=int, default=par.default)
        elif name in ("cache_dir", "exclude_eval"):
            p.add_argument(flag, default=None)
        else:
            p.add_argument(flag, type=type(par.default), default=par.default)
    hints = typing.get_type_hints(Medusa2Options)
    for f in fields(Medusa2Options):  # unset (None) unless given: medusa1 refuses them, medusa2 has defaults
        if f.name not in ("warmup_epochs", "heads_lr"):  # --epochs and --lr are the warm-up's and the heads'
            kind = next((t for t in (int, float) if t in (hints[f.name], *typing.get_args(hints[f.name]))), str)
            p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None)
    a = vars(p.parse_args(argv))
    model, data, out = a.pop("model"), a.pop("data"), a.pop("out")
    run_train_heads(model, data, out, **a)


if __name__ == "__main__":
    main()
