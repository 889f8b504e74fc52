"""Checkpoints to measure on, with random weights: make_bench_model.py (a scaled-down MoE and a dense model of
the same size), the tiny Qwen2-style tokenizer, the tiny HF models of every architecture, and AWQ/GPTQ folders
quantized from them. The test suite builds its fixtures with the same writers."""
