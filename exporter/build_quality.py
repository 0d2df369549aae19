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

    need = max(_prompt_length(tokenizer, p, i) for i, p in enumerate(_prompt_list(prompts))) + QUALITY_NEW_TOKENS + 1
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


def _prompt_list(prompts) -> list[str]:
    """``prompts`` as a list of texts; InputError for one string (read character by character, each a prompt) or
    anything but texts."""
    texts = list(prompts) if isinstance(prompts, (list, tuple)) else None
    if texts is None or not all(isinstance(p, str) for p in texts):
        kind = (type(prompts).__name__ if texts is None else
                f"a list holding {type(next(p for p in texts if not isinstance(p, str))).__name__}")
        raise InputError(f"quality_prompts must be a list of prompt texts, not {kind}: pass a list of strings")
    return texts


def _prompt_length(tokenizer, prompt: str, index: int) -> int:
    """Tokens of quality prompt ``index``; an InputError that names it where the tokenizer refuses it or it has no
    tokens (the quality check refused such a prompt only after the whole export)."""
    try:
        ids = tokenizer.encode_prompt(prompt)
    except InputError as e:
        raise InputError(f"quality prompt {index + 1} ({prompt[:40]!r}): {e}") from None
    if not ids:  # refused by the quality check itself, after the whole export
        raise InputError(f"quality prompt {index + 1} ({prompt[:40]!r}) has no tokens: remove it, or give it text")
    return len(ids)
