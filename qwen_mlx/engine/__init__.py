"""The engine: one generation loop for the terminal and the server, with continuous batching.

- scheduler.py: the `Engine` (requests.py: requests in, token events out), run on its own thread by the
  server or stepped in the caller's thread for one request at a time; local.py: `chat` and `generate` on it.
- batching.py: the batched backend interface it drives, the serial fallback for one-cache backends and
  the prefix LRU (pure Python).
- mlx_batch.py, mlx_sampling.py: MLX's batched backend and its on-device sampling (imported by
  qwen_mlx.mlx_backend, never from here: importing this package imports neither MLX nor torch).
"""

from .batching import BatchBackend, Draw, PrefixCache, SerialBatch, batch_backend
from .local import generate, local_engine, stream_generate
from .requests import Constraint, Done, Failed, Handle, Overloaded, Request, ShuttingDown, Token
from .scheduler import Engine, run_requests

__all__ = ["BatchBackend", "Constraint", "Done", "Draw", "Engine", "Failed", "Handle", "Overloaded", "PrefixCache",
           "Request", "SerialBatch", "ShuttingDown", "Token", "batch_backend", "generate", "local_engine",
           "run_requests", "stream_generate"]
