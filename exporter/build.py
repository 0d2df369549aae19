"""`medusa-export build`: model + heads -> a self-contained artifact directory.

    build_artifact(None, "artifacts/smollm2", BuildOptions(tree="cpu_small_10", max_seq=2048))

Steps: check ``out`` (only a new or empty directory, or an earlier artifact, is replaced: `output_dir`), load,
export the Medusa graph and the vanilla graph, fold their constants (`onnx_cleanup`), quantize them (`quantize`,
int8/int4), validate both against PyTorch, write the tokenizer, the heads and, last, the manifest
(`runtime.manifest.Manifest`). Everything is written into ``<out>.partial-*`` and renamed into place only when
complete, so a failed or interrupted build leaves the earlier artifact as it was and nothing that looks like one.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import time

import numpy as np
from pathlib import Path
from typing import Callable

from medusa_export.runtime import __version__, io_table
from medusa_export.runtime.manifest import (FORMAT, FORMAT_VERSION, ONNXRUNTIME, CleanupRecord, DraftsRecord,
                                             ExporterRecord, GraphRecord, HeadsRecord, Manifest, ModelRecord,
                                             QuantizationRecord, TensorRecord, TreeRecord, file_record, graph_dtype,
                                             kv_layout_of)
from medusa_export.runtime.errors import ExportValidationError, HeadsError, InputError
from medusa_export.runtime.manifest import UNFINISHED
from medusa_export.runtime.tree import Tree, fitted_default
from medusa_export.runtime.whole_file import missing_parents, remove_empty

from medusa_export.runtime.build_options import DEFAULT_TREE, BuildOptions
from .fused_backbone import check_supported
from .fused_graph import export_fused_graph
from .build_quality import below_bar_advice, check_quality_fits, quantized_quality
from .heads import save_heads
from .heads_source import resolve_heads
from .model_checks import check_length_effects
from .model_loading import load_base_model
from .onnx_cleanup import fold_constants
from .onnx_export import OPSET, export_step_graph
from .output_dir import check_out_dir, new_work_dir, release_work_dir, replace_dir
from .provenance import content_sha256, record_name
from .quantize import CALIBRATION, RECIPES, quantize_graph
from .shared_weights import share_weights
from .source_grid import fma_grid_of, on_4bit_grid
from .step_model import StepModel
from .torch_backend import model_dims
from .validate import validate_graph


def build_artifact(model: str | None, out: str | Path, options: BuildOptions = BuildOptions(),
                   quality_prompts: list[str] | None = None, log: Callable[[str], None] = print) -> Manifest:
    """``model``: a HF directory, a .gguf, or None for the built-in model. ``quality_prompts``: for int8/int4,
    prompts on which the quantized graph's teacher-forced top-1 agreement and perplexity change against the fp32
    model are measured and stored in the manifest (``manifest.quality``)."""
    if not isinstance(options, BuildOptions):
        raise InputError(f"options must be a BuildOptions, not {type(options).__name__}")
    for name, value in (("out", out), ("model", model)):
        if not (isinstance(value, (str, os.PathLike)) or (value is None and name == "model")):
            raise InputError(f"{name} must be a path{' or None' if name == 'model' else ''}, not {type(value).__name__}")
    out = Path(out)
    check_out_dir(out)  # before the long export
    if options.attention == "kernel":
        from medusa_export.runtime import kernels

        kernels.library_path()  # compiled now (or a one-line error) rather than after the export
    if options.corpus_drafts == "sharegpt":
        from .training.sharegpt import sharegpt_file

        sharegpt_file("--corpus-drafts sharegpt (the default for the built-in model; --corpus-drafts none builds "
                      "without it)", "export")  # InputError naming the package now, not after the export
    t_start = time.perf_counter()
    step_log = _StepLog(log)
    with step_log("load model and heads"):
        loaded = load_base_model(model)
        chosen = resolve_heads(options.heads, loaded)
    if options.quantized and quality_prompts:
        check_quality_fits(loaded.tokenizer, quality_prompts, options.max_seq)
    trained = getattr(loaded.model.config, "max_position_embeddings", None)
    if isinstance(trained, int) and options.max_seq > trained:  # allowed (RoPE extends), but worth knowing
        log(f"  note: --max-seq {options.max_seq} is past the model's max_position_embeddings {trained}: it was "
            f"never trained on positions beyond")
    options = _fit_topk(options, loaded.model.config.vocab_size, log)
    if chosen.heads.draft_ids is not None and chosen.heads.config.draft_vocab_size < options.head_topk:
        raise HeadsError(f"the heads score a draft vocabulary of {chosen.heads.config.draft_vocab_size} tokens, fewer "
                         f"than --head-topk {options.head_topk}: use --head-topk {chosen.heads.config.draft_vocab_size} "
                         f"or less, or heads with a larger draft vocabulary")
    tree_spec = options.tree or _default_tree(chosen.path, options.dtype)
    num_heads = chosen.heads.config.num_heads
    tree_obj = Tree.from_choices(fitted_default(tree_spec, DEFAULT_TREE, num_heads), topk=options.head_topk,
                                 num_heads=num_heads)
    check_length_effects(loaded.model.config, options.max_seq)  # no graph implements one: before any export
    if options.graph == ONNXRUNTIME:
        # before any export: the portable graph covers the rest
        check_supported(loaded.model.config, attention=options.attention, dtype=options.dtype)
    # Weights already on a 4-bit grid (a Q4_0 / Q4_1 GGUF) are kept exactly by int4: decided before smoothing, which
    # would move them off it.
    grid = options.dtype == "int4" and on_4bit_grid(loaded.model)
    if options.recipe == "int4_rows16" and not grid:
        raise InputError("--int4-matmul rows16 keeps the 4-bit blocks a model already has (a Q4_0 / Q4_1 GGUF, as the "
                         "built-in model), and this model's decoder weights are not such blocks: use --dtype int8 "
                         "--int8-matmul rows16, or --int4-matmul blocks")
    if options.fp32_matmul == "blocks" and not on_4bit_grid(loaded.model, fit=fma_grid_of):
        raise InputError("--fp32-matmul blocks reads the 4-bit blocks a model's fp32 weights already are (a Q4_0 / "
                         "Q4_1 GGUF with fp16 steps, as the built-in model), and this model's decoder weights are not "
                         "such blocks: use --fp32-matmul full")
    made = missing_parents(out)
    work = new_work_dir(out)
    try:
        if grid:
            log("  int4: the decoder's weights are already a 4-bit grid: kept exactly, not smoothed")
        if (alpha := _recipe(options, "smooth_alpha", 0.0)) and not grid:
            with step_log(f"smooth activations for {options.dtype} ({CALIBRATION.stop - CALIBRATION.start} packaged prompts)"):
                _smooth(loaded, alpha)
        graphs, validation = {}, {}
        for kind, h in (("medusa", chosen.heads), ("vanilla", None)):
            graphs[kind], validation[kind] = _export_graph(loaded, kind, h, tree_obj, options, work, step_log, grid)
        if options.lanes:
            graphs["lanes"] = _export_lanes(loaded, options, work, step_log, grid)
        with step_log("store the graphs' weights once (weights.bin)"):
            share_weights(work, [g.file for g in graphs.values()])
        loaded.tokenizer.save(work)
        drafts = _corpus_table(loaded.tokenizer, loaded.model.config.vocab_size, options, work, step_log, chosen.path)
        save_heads(chosen.heads, work / "heads")
        dims = model_dims(loaded.model.config, chosen.heads, options.head_topk, options.sample_topk,
                          dtype=graph_dtype(options.dtype), kv_dtype=options.kv_dtype)
        manifest = _manifest(loaded, chosen, dims, tree_spec, tree_obj, options, graphs, validation, work, drafts)
        manifest.write(work)
        if options.lanes:
            with step_log("check that a batched step equals one-sequence steps, bit for bit"):
                validation["lanes"] = _check_lanes(work)
            manifest = manifest.replace(validation=validation)
            manifest.write(work)
        if options.quantized and quality_prompts:
            with step_log(f"measure {options.dtype} quality against fp32 ({len(quality_prompts)} prompts)"):
                manifest = manifest.replace(quality=quantized_quality(loaded, work, quality_prompts, options.max_seq))
            manifest.write(work)
            q = manifest.quality
            log(f"  quality: top-1 agreement {q.top1_agreement:.4f} (bar {q.bar}), perplexity "
                f"{q.perplexity_reference:.3f} -> {q.perplexity:.3f} ({q.perplexity_change:+.2%})"
                + ("" if q.passes else f": below the bar, {below_bar_advice(options)}"))
        replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        remove_empty(made)
        raise
    finally:
        release_work_dir(work)
    log(f"artifact ready: {out} ({time.perf_counter() - t_start:.0f} s)")
    return manifest


def _corpus_table(tokenizer, vocab_size: int, options: BuildOptions, work: Path, step_log,
                  heads_path: str | None) -> DraftsRecord | None:
    """The corpus-draft table (`corpus_table`), when asked for; its manifest record. ``vocab_size``: the model's
    (`manifest.dims`, what loading checks the table against), which may exceed the tokenizer's. The model's own
    answers (`own_answers`) count too when its heads directory has them."""
    if options.corpus_drafts == "none":
        return None
    from medusa_export.runtime.corpus_drafts import FILE

    from .corpus_table import MIN_COUNT, count_table, encode_texts, sharegpt_answers
    from .own_answers import FILE as ANSWERS, WEIGHT, load_answers

    answers_file = Path(heads_path) / ANSWERS if heads_path and Path(heads_path).is_dir() else None
    answers = load_answers(answers_file, vocab_size) if answers_file and answers_file.is_file() else []
    what = "ShareGPT assistant turns" + (f" and the model's {len(answers)} answers" if answers else "")
    with step_log(f"count the corpus-draft table ({what})"):
        texts, source = sharegpt_answers()
        streams = encode_texts(tokenizer, texts)
        table = count_table(streams + answers, vocab_size, weights=[1] * len(streams) + [WEIGHT] * len(answers))
        table.save(work / FILE)
    answers_tokens = int(sum(len(a) for a in answers))
    if answers_tokens:
        source += f"; the model's own answers beside its heads ({len(answers)} answers, each counted {WEIGHT} times)"
    return DraftsRecord(file=FILE, source=source, corpus_tokens=int(sum(len(s) for s in streams)),
                        max_ngram=table.max_ngram, min_count=MIN_COUNT, entries=table.entries,
                        answers_tokens=answers_tokens, answers_weight=WEIGHT if answers_tokens else 0)


def _smooth(loaded, alpha: float) -> None:
    """Fold SmoothQuant scales into the loaded model (`smoothing`), in place: every graph is exported from the same
    smoothed weights, and the quality reference is the same model in exact arithmetic."""
    from medusa_export.runtime.prompts import read_prompts

    from .smoothing import smooth_activations

    texts = read_prompts(None, limit=CALIBRATION.stop)[CALIBRATION]
    smooth_activations(loaded.model, [loaded.tokenizer.encode_prompt(t) for t in texts], alpha)


def _recipe(options: BuildOptions, key: str, unquantized):
    """A property of the quantization recipe the graphs are exported for (``unquantized`` for fp32 / fp16)."""
    return RECIPES[options.recipe][key] if options.quantized else unquantized


def _export_graph(loaded, kind: str, heads, tree: Tree, options: BuildOptions, work: Path,
                  step_log, grid: bool = False) -> tuple[GraphRecord, dict]:
    """Export, fold, quantize and validate one graph; its manifest record and validation report. ``grid``: the
    weights are a 4-bit grid that int4 keeps exactly (`source_grid`)."""
    dt, fused = graph_dtype(options.dtype), options.graph == ONNXRUNTIME
    layout = kv_layout_of(options.graph)
    step = StepModel(loaded.model, heads, options.head_topk, options.sample_topk)
    path = work / f"{kind}.onnx"
    # Fused graphs verify the tree per root-to-leaf path (exact, runtime/tree_paths.py): as many attention groups
    # as the tree has paths.
    paths = len(tree.paths_nodes) if fused and heads is not None else 1
    min_rows = _recipe(options, "min_rows", 1)
    rotation = _recipe(options, "rotation", 0)
    with step_log(f"export {kind} graph ({options.dtype}, {options.graph})"):
        if fused:
            export_fused_graph(step, path, dtype=dt, max_positions=options.max_seq, paths=paths, min_rows=min_rows,
                               rotation=rotation, attention=options.attention, kv_dtype=options.kv_dtype)
        else:
            export_step_graph(step, path, dtype=dt)
    with step_log(f"fold constants in the {kind} graph (Polygraphy)"):
        cleanup = CleanupRecord(**fold_constants(path))
    source_blocks = _kernel_rewrites(path, options, step_log)
    quantization = None
    if options.quantized:
        with step_log(f"quantize the {kind} graph's weights ({options.dtype})"):
            quantization = QuantizationRecord(**quantize_graph(path, options.recipe, source_grid=grid))
    with step_log(f"validate {kind} graph against PyTorch"):
        # A quantized graph differs from PyTorch by design: its errors are recorded, and its quality is measured
        # on real text (`quality`), not held to the fp32 tolerance.
        validation = validate_graph(step, path, dtype=dt, kv_layout=layout, enforce=not options.quantized, paths=paths,
                                    attention=options.attention, kv_dtype=options.kv_dtype,
                                    approximate=("medusa_token_ids",) if options.lm_head == "screened" else (),
                                    max_positions=options.max_seq)
    n = loaded.model.config.num_hidden_layers
    tensors = lambda ts: [TensorRecord(t.name, t.dtype, list(t.axes)) for t in ts]  # noqa: E731
    record = GraphRecord(file=path.name, inputs=tensors(io_table.inputs(n, layout, paths)),
                         outputs=tensors(io_table.outputs(n, heads is not None, layout, paths)), paths=paths,
                         cleanup=cleanup, quantization=quantization, source_blocks=source_blocks)
    return record, validation


def _kernel_rewrites(path: Path, options: BuildOptions, step_log) -> int:
    """The kernel library's rewrites of the graph at ``path``, on one load and one save of it. ``--lm-head
    screened``: the base lm_head and reduction rewritten (`screened_lm_head`); with fp32 weights the heads' matmuls
    (drafts only) go int8 per row too (`quantize_rows`; an int8 rows recipe quantizes them with the rest).
    ``--fp32-matmul blocks``: every MatMul whose fp32 weights are 4-bit blocks exactly becomes BlockMatMulF32Q4
    (`source_grid.exact_f32_matmuls`). How many MatMuls the latter rewrote."""
    screened, blocks = options.lm_head == "screened", options.fp32_matmul == "blocks"
    if not (screened or blocks):
        return 0
    import onnx

    from .fused_graph import save_graph

    model = onnx.load(str(path))
    if screened:
        from .quantize_rows import quantize_rows
        from .screened_lm_head import HEADS_SCOPE, screen_lm_head

        with step_log(f"screen the lm_head of {path.name} (int8 product, exact fp32 candidates)"):
            screen_lm_head(model, options.sample_topk)
            if not options.quantized:
                quantize_rows(model, keep=lambda name: HEADS_SCOPE not in name)
    rewritten = 0
    if blocks:
        from .source_grid import exact_f32_matmuls

        with step_log(f"read {path.name}'s weights as the model's 4-bit blocks (fp32 arithmetic)"):
            rewritten = exact_f32_matmuls(model)
    path.with_name(path.name + ".data").unlink(missing_ok=True)  # loaded above; written again if still > 2 GB
    save_graph(model, path)
    return rewritten


class _StepLog:
    """Context manager that prints `name ...` and the seconds it took (progress for long steps)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log

    def __call__(self, name: str):
        self.name = name
        return self

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.log(f"  {self.name} ...")

    def __exit__(self, *exc):
        if exc[0] is None:
            self.log(f"  {self.name}: done in {time.perf_counter() - self.t0:.1f} s")


def _export_lanes(loaded, options: BuildOptions, work: Path, step_log, grid: bool = False) -> GraphRecord:
    """The batched graph (`lanes_graph`): exported, folded and quantized like the others; validated against the
    one-sequence graphs once the artifact is assembled (`_check_lanes`)."""
    from .lanes_graph import export_lanes_graph

    path = work / "lanes.onnx"
    step = StepModel(loaded.model, None, options.head_topk, options.sample_topk)
    with step_log(f"export the batched graph ({options.lanes} lanes, {options.dtype})"):
        export_lanes_graph(step, path, options.lanes, graph_dtype(options.dtype), options.max_seq,
                           _recipe(options, "rotation", 0), options.attention, options.kv_dtype)
    with step_log("fold constants in the batched graph (Polygraphy)"):
        cleanup = CleanupRecord(**fold_constants(path))
    source_blocks = _kernel_rewrites(path, options, step_log)
    quantization = None
    if options.quantized:
        with step_log(f"quantize the batched graph's weights ({options.dtype})"):
            quantization = QuantizationRecord(**quantize_graph(path, options.recipe, source_grid=grid))
    n = loaded.model.config.num_hidden_layers
    tensors = lambda ts: [TensorRecord(t.name, t.dtype, list(t.axes)) for t in ts]  # noqa: E731
    inputs = io_table.lanes_inputs(n, options.lanes, gathers=options.attention != "kernel")
    return GraphRecord(file=path.name, inputs=tensors(inputs),
                       outputs=tensors(io_table.lanes_outputs(n, options.lanes)), lanes=options.lanes,
                       cleanup=cleanup, quantization=quantization, source_blocks=source_blocks)


def _check_lanes(work: Path) -> dict:
    """ExportValidationError unless a batched step gives every sequence exactly its one-sequence numbers."""
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.lanes_check import lanes_exactness

    with MedusaRuntime.load(work, backend="ort") as rt:
        backend = rt.generator.backend
        vocab = backend.dims.vocab_size
        rng = np.random.default_rng(0)
        report = lanes_exactness(backend, [rng.integers(0, vocab, n).tolist() for n in (5, 17, 1, 40)])
    if not report["exact"]:
        raise ExportValidationError(
            f"the batched graph's rows differ from one-sequence steps on this machine (max difference "
            f"{report['max_abs_difference']:.3g}): the answers would depend on the batch; rebuild with --max-num-seqs 1 "
            f"and report the CPU and ONNX Runtime version")
    return report


def _fit_topk(options: BuildOptions, vocab_size: int, log: Callable[[str], None]) -> BuildOptions:
    """``options`` with --sample-topk and --head-topk cut to the model's vocabulary, where they exceed it: the graphs
    then rank every word (the trace failed with torch's "selected index k out of range" for a vocabulary under the
    default sample top-k of 32, which the CLI does not let a user change)."""
    cut = {name: vocab_size for name in ("sample_topk", "head_topk") if getattr(options, name) > vocab_size}
    if not cut:
        return options
    log(f"  note: the model's vocabulary has {vocab_size} tokens, fewer than "
        + " and ".join(f"{name.replace('_', '-')} {getattr(options, name)}" for name in cut)
        + f": the graphs rank all {vocab_size}")
    return dataclasses.replace(options, **cut)


def _default_tree(heads_path: str | None, dtype: str = "fp32") -> str:
    """The heads' calibrated tree for this weight dtype (``tree_int8.json``: step costs differ by dtype), else
    their ``tree.json``, else the built-in default."""
    for name in (f"tree_{dtype}.json", "tree.json"):
        if heads_path and (Path(heads_path) / name).exists():
            return str(Path(heads_path) / name)
    return DEFAULT_TREE


def _manifest(loaded, chosen, dims, tree_spec: str, tree: Tree, options: BuildOptions, graphs: dict,
              validation: dict, work: Path, drafts: DraftsRecord | None = None) -> Manifest:
    import onnx
    import torch
    import transformers

    cfg = loaded.model.config
    files = sorted(p for p in work.rglob("*") if p.is_file() and not p.name.startswith(UNFINISHED))
    heads = chosen.heads.config
    return Manifest(
        format=FORMAT, format_version=FORMAT_VERSION, package_version=__version__,
        exporter=ExporterRecord(torch.__version__, transformers.__version__, onnx.__version__, OPSET,
                                platform.python_version()),
        # Names and sha256 only: the manifest travels with the artifact, machine paths would not mean anything.
        model=ModelRecord(name=record_name(loaded.identity["name"]), source=record_name(loaded.identity["source"]),
                          sha256_16=loaded.identity["sha256_16"],
                          sha256=content_sha256(loaded.path) if loaded.path else None, model_type=cfg.model_type,
                          hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers, vocab_size=cfg.vocab_size),
        heads=HeadsRecord(num_heads=heads.num_heads, num_layers=heads.num_layers, layout=heads.layout,
                          trained=chosen.trained, source=record_name(chosen.source_name),
                          sha256=content_sha256(chosen.path) if chosen.path else None, directory="heads"),
        dims=dims, max_seq=options.max_seq,
        tree=TreeRecord(name=record_name(Path(tree_spec).stem if tree_spec.endswith(".json") else tree_spec),
                        medusa_choices=tree.to_json(), num_nodes=tree.num_nodes),
        graph_format=options.graph, kv_layout=kv_layout_of(options.graph), weights=options.dtype,
        graphs=graphs, validation=validation,
        files={p.relative_to(work).as_posix(): file_record(p) for p in files}, drafts=drafts,
        attention=options.attention, lm_head=options.lm_head)
