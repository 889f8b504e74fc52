"""The torch twin and onnxruntime as backends of the shared generation loop (qwen_mlx.backends), each with
its continuous-batching form; export/__init__.py registers them."""
