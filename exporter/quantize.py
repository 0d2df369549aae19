"""Weight quantization of an exported graph for ONNX Runtime on CPUs; activations stay fp32 between operators.

    record = quantize_graph(Path("out/medusa.onnx"), "int4")    # rewrites the file, returns the recipe record

Every MatMul whose weight is a constant is quantized: the decoder's, the lm_head and the heads' projection
(a recipe may keep named ones in fp32: ``keep_fp32``), except the input rotations (`rotation`), which transform
activations. int4 of a model whose decoder weights already are 4-bit blocks (``source_grid``: a Q4_1 / Q4_0 GGUF,
as the built-in model) keeps those blocks exactly and takes 8 bits for the rest (`source_grid`). The recipes were chosen by measurement on the reference
CPU (docs/quantization.md): the cost of a T=1 step, the cost of each extra tree node,
quality against fp32, and whether a row's result depends on the other rows of the step (necessary for greedy
Medusa to equal greedy vanilla, though not sufficient: see docs/quantization.md):

* ``MatMulNBits`` with ``accuracy_level`` 4 quantizes activations per block of each row: a row's result is
  bit-identical whatever the other rows of the step (checked for every matrix shape of the default model);
* ``quantize_dynamic`` (``MatMulInteger``) was measured too: one activation scale for the whole step makes a
  node's numbers depend on its siblings (4/20 MT-Bench answers identical), so it is not offered;
* ``accuracy_level`` 1 (fp32 activations) keeps 98.3 % top-1 agreement for int8 but costs ~290 ms per step
  on the reference AVX2 CPU, so it is not offered either.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medusa_export.runtime import kernels

from .quantized_embedding import embed_from_lm_head
from .rotation import is_rotation
from .source_grid import exact_4bit_matmuls, exact_8bit_matmuls, is_offset

# min_rows: the rows every quantized matmul must see for a row's result not to depend on how many there are
# (the graph pads a one-token step to two rows: `fused_backbone` ``pad_rows``). Measured on an AVX2 CPU with
# ONNX Runtime 1.2x: int4 MatMulNBits gives a different last bit at M = 1 than at M >= 2; int8 does not.
# smooth_alpha: SmoothQuant migration strength folded into the weights before quantizing (`smoothing`; 0: none),
# calibrated on the packaged prompts CALIBRATION (the build's default quality check reads the first 10, not these).
# Measured on the default model: int8 top-1 agreement with fp32 96.1 % -> 97.3 % on 40 held-out ShareGPT prompts;
# int4 73.9 % -> 77.5 % and 70.0 % -> 72.6 % (perplexity change +46.5 % -> +30.2 %, +52 % -> +38 %) on 100 others.
# rotation: the decoder matmuls' inputs turned per block of up to this many columns by a randomized Hadamard
# matrix, undone in the weights (`rotation`; 0: none). Measured on the default model with smoothing: int8 top-1
# agreement 97.5 % -> 98.3 % and 97.3 % -> 98.1 % on two held-out prompt sets (blocks of 32; blocks of up to 128:
# 98.0 % / 97.5 %), for 3-5 % of a one-token step. int4 (smoothed): 77.5 % -> 78.6 % at the same perplexity, not
# worth the step time there.
RECIPES = {
    "int4": {"method": "MatMulNBits", "bits": 4, "block_size": 32, "symmetric": True, "accuracy_level": 4,
             "min_rows": 2, "smooth_alpha": 0.5, "rotation": 0},
    "int8": {"method": "MatMulNBits", "bits": 8, "block_size": 32, "symmetric": True, "accuracy_level": 4,
             "min_rows": 1, "smooth_alpha": 0.5, "rotation": 32},
    # `quantize_rows`: activations per row (block_size 0: the whole row), weights per column; the base lm_head's
    # input turned by RowQuantize per block of ``lm_head_rotation`` (`ROWS_TURNED`)
    "int8_rows": {"method": "MatMulInteger", "bits": 8, "block_size": 0, "symmetric": True, "accuracy_level": 0,
                  "min_rows": 1, "smooth_alpha": 0.5, "rotation": 32, "lm_head_rotation": 64},
    # `quantize_rows(wide=True)`: BlockMatMul16, weights int8 in blocks of 32, each row's input as int16 (accuracy
    # level 0: the activations are not int8); the heads stay int8 per row (MatMulInteger), as in int8_rows. Neither
    # smoothed nor turned (the base lm_head, with --lm-head full, neither): with 15 bits per row there is little for
    # either to gain. In PyTorch (blocks of 32, int16 rows, fp32 lm_head, unsmoothed; scripts/int8_torch_sim.py),
    # top-1 agreement on train_prompts [40:100] / [100:160]: unturned 98.31 / 98.20 %, turned per block of 32
    # 98.06 / 98.49 % (docs/quantization.md).
    "int8_rows16": {"method": "BlockMatMul16", "bits": 8, "block_size": 32, "symmetric": True, "accuracy_level": 0,
                    "min_rows": 1, "smooth_alpha": 0.0, "rotation": 0, "lm_head_rotation": 0},
    # `quantize_rows(wide=True, grid4=True)`: the model's own 4-bit blocks (a Q4_0 / Q4_1 GGUF's: `source_grid`) as
    # BlockMatMul16Q4, each row's input as int16; other weight MatMuls (the lm_head with --lm-head full, any off the
    # grid or of other shapes) as int8_rows16 (a Q8_0 weight's blocks come out as they are: its step is max |block| /
    # 127 too), the heads int8 per row. Only for a model on such a grid (`build` checks); neither smoothed nor turned,
    # which would move the weights off it. ``source_grid`` in the record counts the BlockMatMul16Q4 nodes.
    "int4_rows16": {"method": "BlockMatMul16Q4", "bits": 4, "block_size": 32, "symmetric": False, "accuracy_level": 0,
                    "min_rows": 1, "smooth_alpha": 0.0, "rotation": 0, "lm_head_rotation": 0},
}
ROW_METHODS = ("MatMulInteger", kernels.BLOCK_OP, kernels.BLOCK4_OP)  # `quantize_rows`: the kernel library's matmuls
# MatMuls of the int8_rows recipe whose input RowQuantize turns though the graph does not: the base model's lm_head.
# Its input (the final norm's output) unturned under one scale per row cost the most top-1 agreement; as int8 blocks
# (`MatMulNBits`) it cost 2.3x the step time at 8 rows of what it costs per row; turned per block of 64 and per row,
# it agreed best (on train_prompts against the fp32 artifact, [40:100] / [100:160]: blocks 96.8 / 96.6 %, perplexity
# +0.47 / +0.57 %; turned rows 97.2 / 97.1 %, +0.13 / +0.24 %; unturned rows 95.2 % on [40:100]). The heads'
# projection stays per row, unturned: it only proposes drafts.
ROWS_TURNED = ("//lm_head/",)  # the tail's base lm_head ("tail//lm_head/MatMul"), not "heads/lm_head"
CALIBRATION = slice(10, 40)
# int4 of a model whose weights are already a 4-bit grid (`source_grid`): the other weight MatMuls (the lm_head,
# the heads) in 8 bits; a Q8_0 one (the built-in model's tied embedding / lm_head) exactly. For int8 the exact
# Q8_0 lm_head was measured too: top-1 agreement 98.3 -> 98.0 % and 98.6 -> 98.1 % on two prompt sets (noise is
# about 0.3 points), so int8 keeps ONNX Runtime's quantizer there.
GRID_REST_BITS = 8


def quantize_graph(path: Path, recipe_name: str, source_grid: bool = False) -> dict:
    """Quantize the graph at ``path`` in place by ``recipe_name``; its record for the manifest. ``source_grid``
    (int4, when `source_grid.on_4bit_grid` holds for the model): the weights already on a 4-bit grid are kept
    exactly (`source_grid`), every other weight MatMul (the lm_head, the heads) takes 8 bits, a Q8_0 one exactly."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    recipe = dict(RECIPES[recipe_name])
    for key in ("min_rows", "smooth_alpha", "rotation", "lm_head_rotation"):  # recorded with the graph, not used here
        recipe.pop(key, None)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it reports every node it skips
    model = onnx.load(str(path))
    before = _weight_matmuls(model.graph)
    fp32_kept = lambda name: is_rotation(name) or any(part in name for part in recipe.get("keep_fp32", ()))  # noqa: E731
    rows = recipe["method"] in ROW_METHODS
    lm_head_rotation = 0
    if rows:  # per row, every weight MatMul
        from .quantize_rows import quantize_rows, turned_blocks
        from .screened_lm_head import HEADS_SCOPE

        is_lm_head = lambda name: any(part in name for part in ROWS_TURNED)  # noqa: E731
        quantize_rows(model, keep=fp32_kept, turn=is_lm_head, turn_block=RECIPES[recipe_name]["lm_head_rotation"],
                      wide=recipe["method"] != "MatMulInteger", grid4=recipe["method"] == kernels.BLOCK4_OP,
                      per_row=lambda name: HEADS_SCOPE in name)  # the heads: drafts only, a cost flat in rows
        blocks_turned = set(turned_blocks(model.graph, is_lm_head))
        lm_head_rotation = blocks_turned.pop() if len(blocks_turned) == 1 else 0  # what was applied, not what was asked
    blocks = RECIPES["int8"] if rows else recipe  # rows: whatever quantize_rows left (no MatMul of a built graph)
    kept_exact, bits = 0, blocks["bits"]
    if rows:  # what quantize_rows kept of a 4-bit grid
        kept_exact = sum(n.op_type == kernels.BLOCK4_OP for n in model.graph.node)
    elif source_grid:  # the 4-bit blocks, and a Q8_0 weight beside them (the built-in model's tied lm_head), as they are
        kept_exact = (exact_4bit_matmuls(model, recipe["accuracy_level"], skip=fp32_kept)
                      + exact_8bit_matmuls(model, recipe["accuracy_level"], skip=fp32_kept))
        bits = GRID_REST_BITS
    keep = [n.name for n in model.graph.node if n.op_type == "MatMul" and (fp32_kept(n.name) or is_offset(n.name))]
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=blocks["block_size"],
                             is_symmetric=blocks["symmetric"], accuracy_level=blocks["accuracy_level"],
                             nodes_to_exclude=keep)
    q.process()
    quantized = q.model.model
    left = _weight_matmuls(quantized.graph)
    # Per-row graphs keep the fp32 embedding (measured with it; docs/quantization.md)
    embedding = not rows and embed_from_lm_head(quantized, bits, blocks["block_size"])
    onnx.save_model(quantized, str(path))
    record = {"name": f"int{recipe['bits']}" if rows else recipe_name, **RECIPES[recipe_name],
              "tool": f"onnxruntime {onnxruntime.__version__}", "matmuls_quantized": before - left,
              "matmuls_left_fp": left, "embedding": "GatherBlockQuantized on the lm_head's weights" if embedding else "fp32",
              "source_grid": kept_exact}
    if rows:
        record["lm_head_rotation"] = lm_head_rotation
    if source_grid:  # the source's grid is kept: neither smoothed nor rotated (either would move the weights off it)
        asymmetric = any(is_offset(n.name) for n in quantized.graph.node) or _any_block_offset(quantized.graph)
        record.update(smooth_alpha=0.0, rotation=0, other_bits=bits, symmetric=not asymmetric)
    return record


def _any_block_offset(graph) -> bool:
    """Whether a BlockMatMul16Q4 of ``graph`` has a non-zero offset (Q4_1 blocks; Q4_0 blocks have none)."""
    from onnx import numpy_helper

    offsets = {n.input[3] for n in graph.node if n.op_type == kernels.BLOCK4_OP}
    return any(numpy_helper.to_array(i).any() for i in graph.initializer if i.name in offsets)


def _weight_matmuls(graph) -> int:
    """MatMuls left to quantize or left fp32 by choice; the input rotations are not counted."""
    return sum(n.op_type == "MatMul" and not is_rotation(n.name) and not is_offset(n.name) for n in graph.node)
