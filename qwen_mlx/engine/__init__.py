"""The engine: one generation loop for the terminal and the server, with continuous batching.

- scheduler.py: the `Engine` (requests.py: requests in, token events out), run on its own thread by the
  server or stepped in the caller's thread for one request at a time; local.py: `chat` and `generate` on it.
- text.py: streamed text cut at stop strings, and the stats line.
The batched backends it drives are qwen_mlx/backends/ (batching.py: their interface, the serial fallback and
the prefix LRU). Importing this package imports neither MLX nor torch.
"""

from .local import generate, local_engine, stream_generate
from .requests import Constraint, Done, Failed, Handle, Overloaded, Request, ShuttingDown, Token
from .scheduler import Engine, run_requests

__all__ = ["Constraint", "Done", "Engine", "Failed", "Handle", "Overloaded", "Request", "ShuttingDown", "Token",
           "generate", "local_engine", "run_requests", "stream_generate"]
