"""The quality check of a quantized build: the fp32 PyTorch model answers each prompt greedily, the quantized graph
reads those answers teacher-forced, and the build records its top-1 agreement and perplexity change
(docs/quantization.md, "The quality check").

    check_quality_fits(tokenizer, prompts, max_seq)          # before the export: the check must fit max_seq
    record = quantized_quality(loaded, work, prompts, max_seq)
    below_bar_advice(options)                                 # what to build instead when it misses the bar
"""

from __future__ import annotations

from pathlib import Path

from medusa_export.runtime.build_options import BuildOptions
from medusa_export.runtime.errors import InputError
from medusa_export.runtime.manifest import QualityRecord

from .torch_backend import TorchBackend


def below_bar_advice(options: BuildOptions) -> str:
    """What to build instead when a quantized artifact misses the quality bar: int8 and int4 other than rows16 can keep
    their width with each row's activations as int16 (int4: a model on a 4-bit grid; docs/quantization.md); otherwise
    a wider dtype."""
    if options.dtype == "int8" and options.int8_matmul != "rows16":
        return ("--dtype int8 --attention kernel --int8-matmul rows16 keeps more (int16 activations), or prefer a "
                "higher-precision --dtype")
    if options.dtype == "int4" and options.int4_matmul != "rows16":
        return ("--dtype int4 --attention kernel --int4-matmul rows16 keeps more where the model's weights are 4-bit "
                "blocks (a Q4_0 / Q4_1 GGUF), or prefer a higher-precision --dtype")
    return "prefer a higher-precision --dtype"


def check_quality_fits(tokenizer, prompts: list[str], max_seq: int) -> None:
    """InputError before the export when a quality prompt and its answer cannot fit ``max_seq`` (it failed after
    the whole export, advising a flag build does not have)."""
    from medusa_export.runtime.quality import QUALITY_NEW_TOKENS

    need = max(len(tokenizer.encode_prompt(p)) for p in prompts) + QUALITY_NEW_TOKENS + 1
    if need > max_seq:
        raise InputError(f"--max-seq {max_seq} cannot hold the quality check of a quantized build (its longest prompt "
                         f"and answer take {need} tokens): use --max-seq {need} or more")


def quantized_quality(loaded, work: Path, prompts: list[str], max_seq: int) -> QualityRecord:
    """Teacher-forced agreement of the quantized graph with the fp32 PyTorch model on its own greedy answers."""
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.generator import Generator
    from medusa_export.runtime.quality import quality

    reference = Generator(TorchBackend(loaded.model, None, max_seq=max_seq), loaded.tokenizer, None)
    with MedusaRuntime.load(work, backend="ort") as rt:
        return quality(reference, rt.generator, prompts)
