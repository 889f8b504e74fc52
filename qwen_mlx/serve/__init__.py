"""`cli.py serve`: an OpenAI-compatible HTTP server over a loaded backend, on uvicorn.

The caller loads the model (qwen_mlx.backends.load) and hands it over; this package never imports a
backend itself. Layers: app.py translates HTTP <-> engine requests, qwen_mlx.engine schedules, the
backend runs batched forwards. Needs the `serve` extra (fastapi, uvicorn).
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

from ..errors import QwenError

if TYPE_CHECKING:
    from ..backends import LoadedModel
    from ..engine.speculative import Drafter, Speculation

EXTRA_HINT = "the server needs its extra: pip install 'qwen-mlx[serve]' (fastapi, uvicorn, prometheus-client)"
log = logging.getLogger("qwen_mlx.serve")


def require_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise QwenError(f"{EXTRA_HINT}; missing {e.name}") from None


def serve(loaded: LoadedModel, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16,
          api_key: str | None = None, max_queue: int = 64, max_tokens: int = 4096, grace: float = 10.0,
          model_id: str | None = None, out: Any = sys.stderr, speculation: Speculation | None = None,
          drafters: dict[str, Drafter] | None = None) -> None:
    """Serve until SIGINT/SIGTERM; then refuse new requests, give those in flight `grace` seconds to
    finish, end the rest with an error event, and return. `speculation`: the requests' default speculative
    decoding (a request's own `speculative` field wins), with the `drafters` it needs."""
    require_extra()
    import uvicorn

    from ..backends.batching import batch_backend
    from ..engine import Engine
    from .app import ServerConfig, create_app
    from .grammar import make_constraint

    if max_batch < 1:
        raise QwenError(f"--max-batch must be >= 1, got {max_batch}")
    if api_key is not None and not api_key:
        raise QwenError("--api-key is empty")
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: serving on {host} without --api-key: anyone who can reach this port can use the model",
              file=out)
    sock = _bind(host, port)
    batch = batch_backend(loaded.backend, max_batch)
    engine = Engine(batch, loaded.tokenizer, max_queue=max_queue)
    engine.drafters.update(drafters or {})
    engine.start()
    n_vocab = loaded.backend.args.vocab_size
    config = ServerConfig(model_id or loaded.folder.name, loaded.generation_config, api_key, max_tokens,
                          make_constraint=lambda body, tok: make_constraint(body, tok, n_vocab),
                          speculation=speculation)
    app = create_app(engine, config)
    server = _Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=int(grace) + 5,
                                    lifespan="off"), engine, grace)
    bound = sock.getsockname()
    url_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    print(f"qwen-mlx serving {config.model_id} on http://{url_host}:{bound[1]} "
          f"({batch.device}, batch {batch.max_batch}); Ctrl-C stops", file=out, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        engine.shutdown(0)
    print("server stopped", file=out, flush=True)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise QwenError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _make_server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, whose Ctrl-C / SIGTERM first tells the engine to wind down, and which then
        returns normally (exit status 0) instead of re-raising the signal."""

        def __init__(self, config: Any, engine: Any, grace: float):
            super().__init__(config)
            self.engine, self.grace = engine, grace

        def handle_exit(self, sig: int, frame: Any) -> None:
            self.engine.shutdown(self.grace, wait=False)
            super().handle_exit(sig, frame)
            if sig in (signal.SIGINT, signal.SIGTERM):
                self._captured_signals.clear()

    return Server


def _Server(config: Any, engine: Any, grace: float) -> Any:  # noqa: N802 (a class made on first use)
    return _make_server_class()(config, engine, grace)
