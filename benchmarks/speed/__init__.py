"""Speed: prefill / decode throughput, latency and peak memory of our backends, engine and server beside
their peers (mlx-lm, onnxruntime-genai, optimum-onnx, transformers.js), and the micro-benchmarks behind
single code paths (attention, quantized matmul, sampling, MoE layers, MatMulNBits forms, ONNX op profiles)."""
