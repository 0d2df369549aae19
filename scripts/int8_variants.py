"""int8 variants beyond the shipped recipe, by top-1 agreement with fp32 (teacher-forced on the fp32 artifact's greedy
answers): the shipped smoothing (q/k/v and gate/up inputs, strength 0.5) plus smoothing of the ``down_proj`` inputs
(folded into ``up_proj``'s output rows) and / or the ``o_proj`` inputs (folded into ``v_proj``, one scale per KV
channel), MatMuls kept in fp32 by name, and the input rotation's block (``--rotation``; 0: none).

    python scripts/int8_variants.py artifacts/smollm2 artifacts/smollm2-int8 --extra down,o --keep lm_head \
        --prompts train_prompts.jsonl --first 100 --count 40

Only the vanilla graph of a copy of the int8 artifact is rebuilt; one JSON line per prompt set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import onnx
import torch

from medusa_export.exporter.fused_graph import export_fused_graph
from medusa_export.exporter.model_loading import load_base_model
from medusa_export.exporter.gptq import Rounding, input_hessians
from medusa_export.exporter.onnx_cleanup import fold_constants
from medusa_export.exporter.quantize import CALIBRATION, RECIPES
from medusa_export.exporter.quantize_rows import quantize_rows
from medusa_export.exporter.rotation import is_rotation
from medusa_export.exporter.smoothing import input_maxima, smooth_activations, smoothing_scales
from medusa_export.exporter.step_model import StepModel
from medusa_export.runtime.api import MedusaRuntime
from medusa_export.runtime.prompts import read_prompts
from medusa_export.runtime.quality import quality
from script_io import run_main  # noqa: E402


def layer_input_maxima(model, calibration: list[list[int]], attr: str) -> list[torch.Tensor]:
    """Per layer, the largest |input| of each channel of the projection ``attr`` ("mlp.down_proj", ...)."""
    layers = model.model.layers
    maxima = input_maxima(model, calibration, {i: layer.get_submodule(attr) for i, layer in enumerate(layers)})
    return [maxima[i] for i in range(len(layers))]


@torch.no_grad()
def smooth_more(model, calibration: list[list[int]], extra: list[str], alpha: float) -> None:
    cfg = model.config
    kvh, group = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    hd = cfg.hidden_size // cfg.num_attention_heads
    if "down" in extra:
        for layer, a in zip(model.model.layers, layer_input_maxima(model, calibration, "mlp.down_proj")):
            s = smoothing_scales(a, layer.mlp.down_proj.weight.abs().amax(0), alpha)
            layer.mlp.up_proj.weight.div_(s[:, None])
            layer.mlp.down_proj.weight.mul_(s)
    if "o" in extra:  # one scale per channel of a KV head, shared by the query heads of its group
        for layer, a in zip(model.model.layers, layer_input_maxima(model, calibration, "self_attn.o_proj")):
            o = layer.self_attn.o_proj
            w = o.weight.abs().amax(0).view(kvh, group, hd).amax(1)
            s = smoothing_scales(a.view(kvh, group, hd).amax(1), w, alpha)
            layer.self_attn.v_proj.weight.div_(s.reshape(-1)[:, None])
            o.weight.mul_(s[:, None, :].expand(kvh, group, hd).reshape(-1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("fp32_artifact")
    ap.add_argument("int8_artifact")
    ap.add_argument("--extra", default="", help="comma-separated: down, o")
    ap.add_argument("--keep", default="", help="comma-separated MatMul name parts kept in fp32 (e.g. lm_head)")
    ap.add_argument("--alpha", type=float, default=0.5, help="strength of the --extra smoothing")
    ap.add_argument("--main-alpha", type=float, default=RECIPES["int8"]["smooth_alpha"],
                    help="strength of the recipe's own smoothing (q/k/v and gate/up inputs; 0: none)")
    ap.add_argument("--block-size", type=int, default=None, help="weight (and activation) block (default: the recipe's)")
    ap.add_argument("--rotation", type=int, default=RECIPES["int8"]["rotation"],
                    help="largest block of the input rotation (exporter/rotation.py; 0: none; default: the recipe's)")
    ap.add_argument("--prompts", default=None, help="JSONL prompts (default: the packaged set)")
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep-dir", default=None, help="also copy the variant artifact here (for timing it)")
    ap.add_argument("--matmul", choices=("blocks", "rows"), default="blocks",
                    help="rows: MatMulInteger on activations quantized per row (`exporter/quantize_rows.py`; give an "
                         "int8 artifact built with --int8-matmul rows)")
    ap.add_argument("--blocks-for", default="", help="with --matmul rows: MatMul name parts quantized as blocks instead")
    ap.add_argument("--turn", default="", help="with --matmul rows: MatMul name parts whose input RowQuantize turns "
                                               "(blocks of up to --turn-block; e.g. //lm_head/)")
    ap.add_argument("--turn-block", type=int, default=32)
    ap.add_argument("--gptq", action="store_true", help="with --matmul rows: the decoder's and lm_head's int8 weights "
                                                         "rounded by GPTQ on the calibration prompts (`exporter/gptq.py`)")
    ap.add_argument("--residual", default="", help="with --matmul rows: MatMul name parts whose input is quantized in "
                                                   "two passes (the row and what the first pass left; e.g. /down_proj/)")
    args = ap.parse_args()
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    torch.set_num_threads(args.threads)
    loaded = load_base_model(None)
    model, tok = loaded.model.eval(), loaded.tokenizer
    calibration = [tok.encode_prompt(t) for t in read_prompts(None, limit=CALIBRATION.stop)[CALIBRATION]]
    if args.main_alpha > 0:  # 0: no smoothing
        smooth_activations(model, calibration, args.main_alpha)
    smooth_more(model, calibration, [x for x in args.extra.split(",") if x], args.alpha)
    rounding = Rounding(input_hessians(model, calibration)) if args.gptq else None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "variant"
        shutil.copytree(args.int8_artifact, work)
        path = work / "vanilla.onnx"
        export_fused_graph(StepModel(model, None, 10, 32), path, dtype="float32", max_positions=2048,
                           rotation=args.rotation, attention="kernel" if args.matmul == "rows" else "gqa")
        fold_constants(path)
        graph = onnx.load(str(path))
        keep = [n.name for n in graph.graph.node if n.op_type == "MatMul"
                and (is_rotation(n.name) or any(k in n.name for k in args.keep.split(",") if k))]
        if args.matmul == "rows":
            blocks = [b for b in args.blocks_for.split(",") if b]
            turn = [t for t in args.turn.split(",") if t]
            residual = [r for r in args.residual.split(",") if r]
            quantize_rows(graph, keep=lambda name: name in keep or any(b in name for b in blocks),
                          turn=lambda name: any(t in name for t in turn), turn_block=args.turn_block,
                          residual=lambda name: any(r in name for r in residual), rounding=rounding)
        recipe = RECIPES["int8"]
        block = args.block_size or recipe["block_size"]
        q = MatMulNBitsQuantizer(graph, bits=recipe["bits"], block_size=block,
                                 is_symmetric=recipe["symmetric"], accuracy_level=recipe["accuracy_level"],
                                 nodes_to_exclude=keep)
        q.process()
        onnx.save_model(q.model.model, str(path))
        manifest = json.loads((work / "manifest.json").read_text())
        data = path.read_bytes()
        manifest["files"]["vanilla.onnx"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        (work / "manifest.json").write_text(json.dumps(manifest))
        reference = MedusaRuntime.load(args.fp32_artifact, threads=args.threads).generator
        candidate = MedusaRuntime.load(work, threads=args.threads).generator
        prompts = read_prompts(Path(args.prompts) if args.prompts else None,
                               limit=args.first + args.count)[args.first:]
        r = quality(reference, candidate, prompts)
        if args.keep_dir:
            shutil.copytree(work, args.keep_dir)
        print(json.dumps({"matmul": args.matmul, "blocks_for": args.blocks_for, "turn": args.turn,
                          "turn_block": args.turn_block, "residual": args.residual, "gptq": args.gptq, "extra": args.extra, "main_alpha": args.main_alpha, "keep_fp32": args.keep, "alpha": args.alpha, "block_size": block,
                          "rotation": args.rotation, "prompts": args.prompts,
                          "first": args.first, "count": len(prompts), "positions": r.positions,
                          "top1": r.top1_agreement, "perplexity_change": r.perplexity_change,
                          "matmuls_kept": sum(not is_rotation(k) for k in keep)}))


if __name__ == "__main__":
    run_main(main)
