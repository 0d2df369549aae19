"""Which precision settings a TensorRT build uses, from the graph's dtype and the TensorRT version (pure Python).

    plan = choose("float16", "10.3.0")   # strongly typed, no builder flags: the fp16 graph decides
    plan = choose("float32", "11.1.0")   # strongly typed, TF32 cleared so fp32 matmuls stay fp32

Policy: precision comes from the exported graph, never from builder flags.

* TensorRT >= 11 only has strongly typed networks (weak typing and BuilderFlag.FP16/BF16 are gone), so the
  graph's own types (an fp16 or bf16 export) are the precision.
* TensorRT 10: a strongly typed network too (same numerics as ONNX Runtime on the same graph); if that build
  fails, `fallback` gives the weakly typed build with BuilderFlag.FP16 (or BF16) for a reduced-precision graph.
* fp32 graphs: TF32 is cleared (TensorRT enables it by default) so the engine agrees with ONNX Runtime within
  the fp32 tolerance; ``allow_tf32=True`` keeps it for speed.
"""

from __future__ import annotations

from dataclasses import dataclass

_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_WEAK_FLAG = {"float16": "FP16", "bfloat16": "BF16"}


@dataclass(frozen=True)
class PrecisionPlan:
    dtype: str  # the graph's dtype: float32 | float16 | bfloat16
    strongly_typed: bool  # NetworkDefinitionCreationFlag.STRONGLY_TYPED
    set_flags: tuple[str, ...] = ()  # BuilderFlag names to set
    clear_flags: tuple[str, ...] = ()  # BuilderFlag names to clear

    @property
    def label(self) -> str:
        parts = [_SHORT[self.dtype], "strongly typed" if self.strongly_typed else "weakly typed"]
        parts += [f"+{f}" for f in self.set_flags] + [f"-{f}" for f in self.clear_flags]
        return " ".join(parts)

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "strongly_typed": self.strongly_typed, "set_flags": list(self.set_flags),
                "clear_flags": list(self.clear_flags), "label": self.label}


def major_version(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def choose(dtype: str, tensorrt_version: str, strongly_typed: bool = True, allow_tf32: bool = False) -> PrecisionPlan:
    if dtype not in _SHORT:
        raise ValueError(f"graph dtype {dtype!r} is not supported for TensorRT: {', '.join(_SHORT)}")
    major = major_version(tensorrt_version)
    if major < 10:
        raise ValueError(f"TensorRT {tensorrt_version} is too old: the engine builder needs TensorRT 10 or newer")
    clear = ("TF32",) if dtype == "float32" and not allow_tf32 else ()
    if major >= 11 or strongly_typed:
        return PrecisionPlan(dtype, True, (), clear)
    return PrecisionPlan(dtype, False, (_WEAK_FLAG[dtype],) if dtype in _WEAK_FLAG else (), clear)


def fallback(plan: PrecisionPlan, tensorrt_version: str) -> PrecisionPlan | None:
    """The weakly typed plan to retry with when a strongly typed TensorRT 10 build fails; None if there is none."""
    if plan.strongly_typed and major_version(tensorrt_version) == 10:
        return choose(plan.dtype, tensorrt_version, strongly_typed=False, allow_tf32="TF32" not in plan.clear_flags)
    return None
