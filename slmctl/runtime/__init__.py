"""Inference engines behind generate, bench and eval: a model and its tokenizer on PyTorch or ONNX Runtime."""
