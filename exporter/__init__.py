"""medusa_export.exporter: PyTorch side — model loading, Medusa heads, the reference backend, ONNX export, training."""
