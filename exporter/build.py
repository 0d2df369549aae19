"""`medusa-export build`: model + heads -> a self-contained artifact directory.

    build_artifact(None, "artifacts/smollm2", tree="cpu_small_10", dtype="float32", max_seq=2048)

Steps: check ``out`` (only a new or empty directory, or an earlier artifact, is replaced: `output_dir`), load,
export the Medusa graph and the vanilla graph, fold their constants (`onnx_cleanup`), quantize them (`quantize`,
int8/int4), validate both against PyTorch, write the tokenizer, the heads and, last, the manifest. Everything is written into ``<out>.partial-*`` and renamed into place only when
complete, so a failed or interrupted build leaves the earlier artifact as it was and nothing that looks like one.
"""

from __future__ import annotations

import platform
import shutil
import time
from pathlib import Path
from typing import Callable

from medusa_export.runtime import __version__, io_table
from medusa_export.runtime.errors import InputError
from medusa_export.runtime.manifest import (FORMAT, FORMAT_VERSION, ONNXRUNTIME, PORTABLE, WEIGHTS, file_record,
                                             write_manifest)
from medusa_export.runtime.tree import Tree, load_choices

from .fused_backbone import check_supported
from .fused_graph import export_fused_graph
from .heads import save_heads
from .heads_source import resolve_heads
from .model_loading import load_base_model
from .onnx_cleanup import fold_constants
from .onnx_export import OPSET, export_step_graph
from .output_dir import check_out_dir, new_work_dir, replace_dir
from .provenance import content_sha256
from .quantize import QUANTIZED, quantize_graph
from .step_model import StepModel
from .torch_backend import TorchBackend, model_dims
from .validate import validate_graph

DTYPES = WEIGHTS  # int8 / int4: quantized weights, fp32 activations and KV cache
GRAPH_FORMATS = (ONNXRUNTIME, PORTABLE)
_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "int8": "float32", "int4": "float32"}  # graph / KV dtype
DEFAULT_TREE = "cpu_small_10"


def build_artifact(model: str | None, out: str | Path, heads: str | None = None, tree: str | None = None,
                   dtype: str = "fp32", max_seq: int = 2048, head_topk: int = 10, sample_topk: int = 32,
                   graph: str = ONNXRUNTIME, quality_prompts: list[str] | None = None,
                   log: Callable[[str], None] = print) -> dict:
    """``graph``: "onnxruntime" (fused operators, head-major shared KV cache: ONNX Runtime only) or "portable"
    (standard operators: ONNX Runtime and TensorRT). ``quality_prompts``: for int8/int4, prompts on which the
    quantized graph's teacher-forced top-1 agreement and perplexity change against the fp32 model are measured
    and stored in the manifest (``manifest["quality"]``)."""
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)}")
    if graph not in GRAPH_FORMATS:
        raise InputError(f"--graph {graph!r} is not known: use one of {', '.join(GRAPH_FORMATS)}")
    if max_seq < 16:
        raise InputError(f"--max-seq {max_seq} is too small: use at least 16")
    out = Path(out)
    check_out_dir(out)  # before the long export
    t_start = time.perf_counter()
    step_log = _StepLog(log)
    with step_log("load model and heads"):
        loaded = load_base_model(model)
        chosen = resolve_heads(heads, loaded)
    tree_spec = tree or _default_tree(chosen.path, dtype)
    tree_obj = Tree.from_choices(load_choices(tree_spec), topk=head_topk, num_heads=chosen.heads.config.num_heads)
    work = new_work_dir(out)
    try:
        graphs, validation = {}, {}
        dt = _DTYPE_NAMES[dtype]
        layout = io_table.HEAD_MAJOR_SHARED if graph == ONNXRUNTIME else io_table.SEQUENCE_MAJOR
        if graph == ONNXRUNTIME:
            check_supported(loaded.model.config)  # before any export: the portable graph covers the rest
        for kind, h in (("medusa", chosen.heads), ("vanilla", None)):
            step = StepModel(loaded.model, h, head_topk, sample_topk)
            path = work / f"{kind}.onnx"
            # Fused graphs verify the tree per root-to-leaf path (exact, runtime/tree_paths.py): as many attention
            # groups as the tree has paths.
            paths = len(tree_obj.paths_nodes) if graph == ONNXRUNTIME and h is not None else 1
            with step_log(f"export {kind} graph ({dtype}, {graph})"):
                if graph == ONNXRUNTIME:
                    export_fused_graph(step, path, dtype=dt, max_positions=max_seq, paths=paths)
                else:
                    export_step_graph(step, path, dtype=dt)
            with step_log(f"fold constants in the {kind} graph (Polygraphy)"):
                cleanup = fold_constants(path)
            record = {**_graph_record(kind, loaded.model.config.num_hidden_layers, h is not None, layout, paths),
                      "cleanup": cleanup}
            if dtype in QUANTIZED:
                with step_log(f"quantize the {kind} graph's weights ({dtype})"):
                    record["quantization"] = quantize_graph(path, dtype)
            with step_log(f"validate {kind} graph against PyTorch"):
                # A quantized graph differs from PyTorch by design: its errors are recorded, and its quality is
                # measured on real text (`quality`), not held to the fp32 tolerance.
                validation[kind] = validate_graph(step, path, dtype=dt, kv_layout=layout, enforce=dtype not in QUANTIZED,
                                                  paths=paths)
            graphs[kind] = record
        loaded.tokenizer.save(work)
        save_heads(chosen.heads, work / "heads")
        dims = model_dims(loaded.model.config, chosen.heads, head_topk, sample_topk, dtype=dt)
        manifest = _manifest(loaded, chosen, dims, tree_spec, tree_obj, max_seq, graphs, validation, work)
        manifest.update(graph_format=graph, kv_layout=layout, weights=dtype)
        write_manifest(work, manifest)
        if dtype in QUANTIZED and quality_prompts:
            with step_log(f"measure {dtype} quality against fp32 ({len(quality_prompts)} prompts)"):
                manifest["quality"] = _quality(loaded, work, quality_prompts, max_seq)
            write_manifest(work, manifest)
            q = manifest["quality"]
            log(f"  quality: top-1 agreement {q['top1_agreement']:.4f} (bar {q['bar']}), perplexity "
                f"{q['perplexity_reference']:.3f} -> {q['perplexity']:.3f} ({q['perplexity_change']:+.2%})"
                + ("" if q.get("passes") else f": below the bar, prefer a higher-precision --dtype"))
        replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"artifact ready: {out} ({time.perf_counter() - t_start:.0f} s)")
    return manifest


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


def _quality(loaded, work: Path, prompts: list[str], max_seq: int) -> dict:
    """Teacher-forced agreement of the quantized graph with the fp32 PyTorch model on its own greedy answers."""
    from medusa_export.runtime.api import MedusaRuntime
    from medusa_export.runtime.generator import Generator
    from medusa_export.runtime.quality import quality

    reference = Generator(TorchBackend(loaded.model, None, max_seq=max_seq), loaded.tokenizer, None)
    with MedusaRuntime.load(work, backend="ort") as rt:
        return quality(reference, rt.generator, prompts)


def _default_tree(heads_path: str | None, dtype: str = "fp32") -> str:
    """The heads' calibrated tree for this weight dtype (``tree_int8.json``: step costs differ by dtype), else
    their ``tree.json``, else the built-in default."""
    for name in (f"tree_{dtype}.json", "tree.json"):
        if heads_path and (Path(heads_path) / name).exists():
            return str(Path(heads_path) / name)
    return DEFAULT_TREE


def _graph_record(kind: str, num_layers: int, medusa: bool, layout: str, paths: int) -> dict:
    fmt = lambda ts: [{"name": t.name, "dtype": t.dtype, "axes": list(t.axes)} for t in ts]  # noqa: E731
    record = {"file": f"{kind}.onnx", "inputs": fmt(io_table.inputs(num_layers, layout, paths)),
              "outputs": fmt(io_table.outputs(num_layers, medusa, layout, paths))}
    return {**record, "paths": paths} if layout == io_table.HEAD_MAJOR_SHARED else record


def _manifest(loaded, chosen, dims, tree_spec, tree_obj, max_seq, graphs, validation, work: Path) -> dict:
    import onnx
    import torch
    import transformers

    cfg = loaded.model.config
    files = sorted(p for p in work.rglob("*") if p.is_file())
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "exporter": {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
                     "opset": OPSET, "python": platform.python_version()},
        # Names and sha256 only: the manifest travels with the artifact, machine paths would not mean anything.
        "model": {**loaded.identity, "sha256": content_sha256(loaded.path) if loaded.path else None,
                  "model_type": cfg.model_type, "hidden_size": cfg.hidden_size,
                  "num_layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size},
        "heads": {"num_heads": chosen.heads.config.num_heads, "num_layers": chosen.heads.config.num_layers,
                  "layout": chosen.heads.config.layout, "trained": chosen.trained, "source": chosen.source_name,
                  "sha256": content_sha256(chosen.path) if chosen.path else None, "directory": "heads"},
        "dims": dims.__dict__,
        "dtype": dims.dtype,
        "max_seq": max_seq,
        "tree": {"name": Path(tree_spec).stem if tree_spec.endswith(".json") else tree_spec,
                 "medusa_choices": tree_obj.to_json(), "num_nodes": tree_obj.num_nodes},
        "graphs": graphs,
        "validation": validation,
        "files": {str(p.relative_to(work)): file_record(p) for p in files},
        "engines": {},
    }
