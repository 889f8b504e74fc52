"""PyTorch twin of the MLX model, its torch backend, the ONNX export and the onnxruntime backend.

Kept apart from `qwen_mlx` so the MLX runtime never imports torch or onnxruntime.
"""
