"""The engine: one generation loop for the terminal and the server, with continuous batching.

- scheduler.py: the `Engine` (requests in, token events out), run on its own thread by the server or
  stepped in the caller's thread for one request at a time (`chat`, `generate`).
- batching.py: the batched backend interface it drives, the serial fallback for one-cache backends and
  the prefix LRU (pure Python).
- mlx_batch.py: MLX's batched backend (imported by qwen_mlx.mlx_backend, never from here: this package
  imports neither MLX nor torch).
"""

from .batching import BatchBackend, PrefixCache, SerialBatch, batch_backend
from .scheduler import (Constraint, Done, Engine, Failed, Handle, Overloaded, Request, ShuttingDown, Token,
                        run_requests)

__all__ = ["BatchBackend", "Constraint", "Done", "Engine", "Failed", "Handle", "Overloaded", "PrefixCache",
           "Request", "SerialBatch", "ShuttingDown", "Token", "batch_backend", "run_requests"]
