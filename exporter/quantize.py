"""Weight quantization of an exported graph for ONNX Runtime on CPUs; activations stay fp32.

    record = quantize_graph(Path("out/medusa.onnx"), "int4")    # rewrites the file, returns the recipe record

Every MatMul whose weight is a constant is quantized: the decoder's, the lm_head and the heads' projection.
The recipes are chosen by measurement on the reference CPU (README, "Quantized artifacts"); what decides is
both the cost of a T=1 step and the cost of each extra tree node, and that greedy Medusa still equals greedy
vanilla on the same artifact, which needs a row's result not to depend on the other rows of the step:

* ``MatMulNBits`` with ``accuracy_level`` 4 quantizes activations per block of each row: rows stay
  independent, so a tree step computes every node exactly as a one-token step would;
* ``quantize_dynamic`` (``MatMulInteger``) quantizes activations with one scale for the whole step, so a
  node's numbers depend on its siblings: kept only as an experiment (``RECIPES["int8-dynamic"]``).
"""

from __future__ import annotations

from pathlib import Path

RECIPES = {
    "int4": {"method": "MatMulNBits", "bits": 4, "block_size": 32, "symmetric": True, "accuracy_level": 4},
    "int8": {"method": "MatMulNBits", "bits": 8, "block_size": 32, "symmetric": True, "accuracy_level": 4},
    "int8-dynamic": {"method": "quantize_dynamic", "weight_type": "QInt8", "per_channel": True, "reduce_range": True},
}
QUANTIZED = ("int8", "int4")  # the `build --dtype` values that quantize (int8-dynamic only by name, for measuring)


def quantize_graph(path: Path, recipe_name: str) -> dict:
    import onnx
    import onnxruntime

    import logging

    recipe = RECIPES[recipe_name]
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it reports every node it skips
    model = onnx.load(str(path))
    before = sum(n.op_type == "MatMul" for n in model.graph.node)
    if recipe["method"] == "MatMulNBits":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        keep = [n.name for n in model.graph.node if n.op_type == "MatMul" and
                any(part in n.name for part in recipe.get("keep_fp32", ()))]
        q = MatMulNBitsQuantizer(model, bits=recipe["bits"], block_size=recipe["block_size"],
                                 is_symmetric=recipe["symmetric"], accuracy_level=recipe["accuracy_level"],
                                 nodes_to_exclude=keep)
        q.process()
        quantized = q.model.model
    else:
        import tempfile

        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "q.onnx"
            quantize_dynamic(model, out, op_types_to_quantize=["MatMul"], per_channel=recipe["per_channel"],
                             reduce_range=recipe["reduce_range"], weight_type=getattr(QuantType, recipe["weight_type"]))
            quantized = onnx.load(str(out))
    left = sum(n.op_type == "MatMul" for n in quantized.graph.node)
    onnx.save_model(quantized, str(path))
    return {"name": recipe_name, **recipe, "tool": f"onnxruntime {onnxruntime.__version__}",
            "matmuls_quantized": before - left, "matmuls_left_fp": left}
