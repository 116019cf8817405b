"""ONNX export: traceable graphs, export, validation against PyTorch, quantization and its report."""
