"""Benchmarks and measurements, grouped by purpose; every script runs from the repository root as a module:

    python -m benchmarks.speed.bench_mlx --model FOLDER
    python -m benchmarks.quality.quality

- speed/        how fast: our backends and engine beside their peers (mlx-lm, onnxruntime-genai, optimum-onnx,
                transformers.js), and the micro-benchmarks behind one code path (attention, quantized matmul,
                sampling, MoE layers, ONNX op profiles)
- quality/      how exact: perplexity, top-1 agreement and logit parity of every precision, format and backend
                (parity.py and reference.py hold the measuring code, shared with tests/test_real_parity.py)
- peers/        the peer runtimes themselves: setup_peers.sh makes their environments, edge_runtimes.py drives
                each in its own (also the worker those environments run), transformersjs_greedy.mjs in Node
- checkpoints/  random-weight checkpoints to measure on: make_bench_model.py, the tiny tokenizer and tiny HF
                models, the AWQ/GPTQ writer (the test suite builds its fixtures with them too)
- common.py     what the scripts share: the repository root, OpenBLAS before mlx, the real checkpoint's folder,
                the peers' folders, the interleaved-round order

Nothing here imports from tests/ (tests import from here). The package, its group packages and common.py
import only the standard library, so a peer environment can run benchmarks.peers.edge_runtimes as a worker.
"""
