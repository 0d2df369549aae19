"""medusa_export.engines: TensorRT engine building from the exported ONNX."""
