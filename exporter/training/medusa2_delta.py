"""What a LoRA Medusa-2 run changed, apart from the model: the adapters and the heads (tens of MB where the
merged weights are the model's size), so a run on a remote GPU brings back the model directory without its
``model.safetensors`` and the weights are rebuilt where the base model already is.

    restore_weights("models/smollm2-medusa2")          # writes model.safetensors from medusa2_delta.safetensors
    restore_weights("models/big-medusa2", base="path/to/hf-model")

The rebuilt file equals the one the run wrote when both merge on the same kind of device (the same merge of the
same tensors; a GPU's merge may differ from a CPU's in the last bits). The base model must be the one the run
trained (its fingerprint is checked against training.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from medusa_export.runtime.errors import InputError
from medusa_export.runtime.whole_file import readable_as_made

DELTA_FILE = "medusa2_delta.safetensors"
_LORA = "lora::"  # prefix of the adapter tensors (peft's parameter names follow it)


def save_delta(work: Path, adapters: dict[str, torch.Tensor], heads_state: dict[str, torch.Tensor]) -> None:
    """``adapters``: the trainable LoRA tensors by peft name; ``heads_state``: the ``medusa_head.*`` tensors."""
    from safetensors.torch import save_file

    tensors = {_LORA + k: v.detach().cpu().contiguous() for k, v in adapters.items()}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in heads_state.items()})
    save_file(tensors, str(work / DELTA_FILE), metadata={"format": "pt"})
    readable_as_made(work / DELTA_FILE)


def model_weights(model, heads_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Medusa-2 ``model.safetensors`` contents: the (merged) backbone and the ``medusa_head.*`` tensors."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: transformers re-ties it from the embedding at load
    return {**state, **heads_state}


def restore_weights(model_dir: str | Path, base: Any = None) -> Path:
    """Rebuild ``model_dir/model.safetensors`` from the base model and the run's delta. ``base``: the base model
    (path, a loaded model, or None for the one training.json records). Returns the file written."""
    from safetensors.torch import load_file, save_file

    from medusa_export.exporter.model_loading import check_same_model, load_base_model, locate_model

    from .medusa2 import _load_trainable, _peft, _trainable_backbone
    from medusa_export.runtime.training_options import Medusa2Options

    model_dir = Path(model_dir)
    delta, record_file = model_dir / DELTA_FILE, model_dir / "training.json"
    if not delta.exists() or not record_file.exists():
        raise InputError(f"{model_dir} has no {DELTA_FILE} and training.json: point at the directory a LoRA "
                         "`train-heads --mode medusa2` run wrote (full fine-tuning keeps no delta)")
    record = json.loads(record_file.read_text())
    opts = Medusa2Options.from_record(record["options"])
    loaded = base if hasattr(base, "model") else load_base_model(locate_model(record["base_model"], base))
    check_same_model(loaded, record["base_model"])
    tensors = load_file(str(delta))
    student = _trainable_backbone(loaded.model.eval(), opts, _peft())  # as loaded for training (fp32)
    _load_trainable(student, {k.removeprefix(_LORA): v for k, v in tensors.items() if k.startswith(_LORA)},
                    lambda why: InputError(f"{delta} does not fit the options in training.json ({why}): restore the "
                                           f"directory the run wrote"))
    merged = student.merge_and_unload()
    heads_state = {k: v for k, v in tensors.items() if not k.startswith(_LORA)}
    out = model_dir / "model.safetensors"
    tmp = out.with_suffix(".tmp")
    save_file(model_weights(merged, heads_state), str(tmp), metadata={"format": "pt"})
    readable_as_made(tmp)
    tmp.replace(out)
    return out
