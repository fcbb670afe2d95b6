"""Export a model to other runtimes: ONNX (``onnx.py``), checked against PyTorch, fused for ONNX Runtime."""
