"""qwen-mlx: Qwen2-family language models natively in MLX, and the same model exported to ONNX."""

from ._blas import use_fast_blas

use_fast_blas()  # must run before anything imports mlx

__version__ = "0.1.0"
