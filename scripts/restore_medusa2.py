#!/usr/bin/env python
"""Rebuild a Medusa-2 model directory's model.safetensors from the base model and the run's
medusa2_delta.safetensors (LoRA adapters + heads): bring back only the small files from a GPU run.

    # on the GPU machine: the same train-heads command with --device cuda, then copy OUT without model.safetensors
    python scripts/restore_medusa2.py models/smollm2-medusa2                 # base model as training.json records
    python scripts/restore_medusa2.py models/big-medusa2 --model path/to/hf-model
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from script_io import run_main  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path, help="the Medusa-2 directory (training.json, medusa2_delta.safetensors)")
    p.add_argument("--model", default=None, help="base model directory or .gguf (default: the one it recorded)")
    a = p.parse_args(argv)
    from medusa_export.exporter.training.medusa2_delta import restore_weights
    from medusa_export.runtime.errors import MedusaExportError

    try:
        out = restore_weights(a.model_dir, a.model)
    except MedusaExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size / 2**20:.0f} MiB): build it with `medusa-export build {a.model_dir}`")
    return 0


if __name__ == "__main__":
    run_main(main)
