"""Quantization, one module per format; importing the package loads none of them (some need MLX).

- affine.py: MLX's affine layout as `mlx_lm.convert -q` stores it (pure Python, numpy only)
- awq_gptq.py: AWQ and GPTQ checkpoints repacked into that layout without re-rounding a code
- gguf_blocks.py: llama.cpp's block formats that are exactly MLX affine groups
- mlx_convert.py: `convert --quantize`, an MLX quantized folder mlx-lm loads as it is
- kv_cache.py: the quantized KV cache (`--kv-bits`)
- layers.py: MLX's quantized layers, with prefill chunks through BLAS on a CPU
"""
