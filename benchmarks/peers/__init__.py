"""The peer runtimes our ONNX export is run beside: setup_peers.sh makes their environments under
$QWEN_MLX_PEERS, edge_runtimes.py runs each one as a worker in its own environment (benchmarks/speed/bench_onnx.py
and the tests drive it), transformersjs_greedy.mjs is the transformers.js (Node) worker. Standard library only."""
