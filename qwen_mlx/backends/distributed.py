"""The MLX backend over the ranks of an `mx.distributed` group (`mlx.launch`, or any launcher MLX reads).

Every rank loads its part of the model (qwen_mlx/models/sharding.py). Rank 0 alone runs the command: it owns
the terminal or the HTTP port, tokenizes, runs the engine and samples. Each call the engine makes on the
backend or its batch (start a sequence, prefill, decode, verify, release ...) is first broadcast to the other
ranks, which replay it on their own backend, so every rank runs the same forward on the same cache layout and
the collectives inside the model line up. Sampling happens once, on rank 0, from logits every rank holds
whole; the tokens reach the other ranks as the next call's arguments. The other ranks print nothing.

A rank that dies ends the job: the ring backend fails the next collective on rank 0 within about a second,
and a rank that stops answering trips a watchdog after QWEN_MLX_RANK_TIMEOUT seconds (300 by default, a
generous bound on one prefill chunk); either way rank 0 prints one line and exits 1.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import sys
import threading
import weakref
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from ..checkpoint import Checkpoint
from ..errors import QwenError
from ..models.sharding import MODES, shard_model

# Calls that change a backend's state or run its model: replayed on every rank. Anything else (args, device,
# peak_memory_gb, cache_length) is answered by rank 0's own copy.
MIRRORED = {"forward", "forward_all", "snapshot", "rewind", "trim", "batched",  # MLXBackend
            "start", "prefill", "prefill_batch", "decode", "verify", "rollback", "remember", "release", "reset"}
# Calls whose result is an object the engine hands back later (a sequence, a snapshot, a batch backend): each
# rank keeps its own, under the same number.
RETURNS_OBJECT = {"snapshot": False, "batched": False, "start": True}  # True: the first element of a tuple
FRAME = 1024  # bytes broadcast per call; a longer call (a long prompt chunk) takes a second collective
_LOST = re.compile(r"\[(ring|jaccl|mpi|nccl)\]")  # how MLX's backends word a failed collective

# Pipeline by default: one transfer per rank per token, against tensor parallelism's two all-reduces per layer,
# each waiting on the link. Measured over loopback (docs/BENCHMARKS.md, "More than one process"), pipeline
# decodes ~2x faster; tensor pays where the link is fast (Thunderbolt, JACCL) and it halves each machine's reads.
_parallel = "pipeline"
_started = False


def set_parallel(mode: str | None) -> None:
    """`--parallel`: how a group of ranks splits the model (tensor or pipeline)."""
    global _parallel
    if mode:
        _parallel = mode


def several_ranks() -> bool:
    """Whether a launcher started this process as one rank of several (mlx.launch's ring or JACCL, or MPI),
    told from the environment it sets, without connecting to the others."""
    sizes = (os.environ.get(k, "1") for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"))
    return "MLX_RANK" in os.environ or any(s.isdigit() and int(s) > 1 for s in sizes)


def world() -> mx.distributed.Group | None:
    """The group this process was launched in, or None when it runs alone (then MLX's distributed layer, which
    may try MPI, is never touched)."""
    if not several_ranks() or not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def distributed_backend(ckpt: Checkpoint, dtype: str | None, quantize: int | None, kv_bits: int | None,
                        kv_group_size: int, group: mx.distributed.Group, keep_quantized: bool = False):
    """On rank 0, the backend for the command (its calls mirrored to the other ranks). On any other rank,
    load, then replay rank 0's calls until it ends; this process then exits without returning."""
    from .mlx import MLXBackend

    global _started
    if _started:  # the other ranks replay one backend: a second (a draft model) would never reach them
        raise QwenError("only one model runs over several ranks (a draft model does not)")
    _started = True
    if _parallel not in MODES:
        raise QwenError(f"--parallel must be one of {', '.join(MODES)}, got {_parallel!r}")
    rank = group.rank()
    _quiet_ring_messages()
    if rank == 0:
        _on_fatal_signal(group.size())  # from the start: a rank may fail while loading
    backend = MLXBackend(ckpt, dtype, quantize, kv_bits, kv_group_size,
                         shard=lambda model: shard_model(model, group, _parallel), keep_quantized=keep_quantized)
    backend.device += f", {_parallel} parallel over {group.size()} ranks"
    channel = Channel(group)
    if rank != 0:
        _follow(backend, channel)  # never returns
    atexit.register(_stop_followers, channel)
    return Mirror(backend, channel, _Registry(), 0)


class Channel:
    """Rank 0's calls, as JSON, broadcast by all_sum (the other ranks add zeros): MLX's own transport."""

    def __init__(self, group: mx.distributed.Group):
        self.group = group

    def _sum(self, data: np.ndarray) -> np.ndarray:
        out = mx.distributed.all_sum(mx.array(data), group=self.group)
        mx.eval(out)
        return np.array(out)

    def send(self, message: Any) -> None:
        data = json.dumps(message).encode()
        head = len(data).to_bytes(8, "little") + data[:FRAME - 8]
        self._sum(np.frombuffer(head.ljust(FRAME, b"\0"), np.uint8))
        if len(data) > FRAME - 8:
            self._sum(np.frombuffer(data[FRAME - 8:], np.uint8))

    def receive(self) -> Any:
        frame = self._sum(np.zeros(FRAME, np.uint8)).tobytes()
        n = int.from_bytes(frame[:8], "little")
        data = frame[8:8 + n]
        if n > FRAME - 8:
            data += self._sum(np.zeros(n - (FRAME - 8), np.uint8)).tobytes()
        return json.loads(data)


class _Registry:
    """The objects a call returned, by number (the same numbers on every rank: calls run in the same order);
    a number is dropped on every rank once rank 0's engine lets go of its handle."""

    def __init__(self):
        self.next = 1  # 0 is the backend
        self._dead: list[int] = []
        self._lock = threading.Lock()  # handles die on whichever thread the garbage collector runs

    def forget(self, number: int) -> None:
        with self._lock:
            self._dead.append(number)

    def take_dead(self) -> list[int]:
        with self._lock:
            dead, self._dead = self._dead, []
        return dead


class Handle:
    """What rank 0's engine holds for an object each rank keeps its own copy of."""

    def __init__(self, number: int, obj: Any, registry: _Registry):
        self.number, self.obj = number, obj
        weakref.finalize(self, registry.forget, number)


class Mirror:
    """Rank 0's view of a backend (or its batch): a call in MIRRORED is broadcast, then run here."""

    def __init__(self, obj: Any, channel: Channel, registry: _Registry, number: int):
        self._obj, self._channel, self._registry, self._number = obj, channel, registry, number

    def samples_on_device(self, params: Any) -> bool:
        return False  # the sampled tokens would never reach the other ranks' next call: sample on the host

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._obj, name)
        if name in ("cache", "model"):
            raise QwenError("--prompt-cache, --mtp and attention maps need the model and its cache whole in one "
                            "process: they do not work over several ranks")
        if name not in MIRRORED or not callable(value):
            return value

        def call(*args: Any) -> Any:
            registry = self._registry
            message = [self._number, name, _encode(args), registry.take_dead()]
            result = _guarded(lambda: (self._channel.send(message), value(*_unwrap(args)))[1])
            return _register(name, result, registry, lambda obj, n: Mirror(obj, self._channel, registry, n)
                             if name == "batched" else Handle(n, obj, registry))
        return call


def _register(name: str, result: Any, registry: _Registry, wrap: Callable[[Any, int], Any]) -> Any:
    if name not in RETURNS_OBJECT or result is None:
        return result
    number, registry.next = registry.next, registry.next + 1
    if RETURNS_OBJECT[name]:
        return (wrap(result[0], number), *result[1:])
    return wrap(result, number)


def _encode(value: Any) -> Any:
    if isinstance(value, Handle):
        return {"#": value.number}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.integer):
        return int(value)
    return value


def _unwrap(value: Any) -> Any:
    if isinstance(value, Handle):
        return value.obj
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v) for v in value)
    return value


def _follow(backend: Any, channel: Channel) -> None:
    """A rank other than 0: replay each call rank 0 makes, until it stops (or is gone); then exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every rank: rank 0 decides when this one ends
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)  # the other ranks print nothing; a failure is told by rank 0
    objects: dict[int, Any] = {0: backend}
    counter = [1]

    def decode(value: Any) -> Any:
        if isinstance(value, dict):
            return objects[value["#"]]
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    try:
        while True:
            message = channel.receive()
            if message is None:
                break
            number, name, args, dead = message
            for n in dead:
                objects.pop(n, None)
            try:
                result = getattr(objects[number], name)(*decode(args))
            except Exception as e:  # rank 0 ran the same call and met the same error; a lost peer ends this
                if _LOST.search(str(e)):
                    raise
                continue
            if name in RETURNS_OBJECT and result is not None:  # numbered as rank 0's _register numbers it
                objects[counter[0]] = result[0] if RETURNS_OBJECT[name] else result
                counter[0] += 1
    except Exception:
        os._exit(1)
    os._exit(0)


def _stop_followers(channel: Channel) -> None:
    """At rank 0's exit: tell the other ranks to end (a rank already gone, or silent for 10 s, is let be)."""
    timer = threading.Timer(10, os._exit, [0])
    timer.daemon = True
    timer.start()
    try:
        channel.send(None)
    except Exception:
        pass
    timer.cancel()


_fatal = threading.Lock()


def _die(message: str) -> None:
    """One line on rank 0's real stderr, then out at once (no traceback, no waiting on a peer)."""
    if _fatal.acquire(blocking=False):
        os.write(_stderr_fd, f"error: {message}\n".encode())
        os._exit(1)


def _guarded(run: Callable[[], Any], timeout: float | None = None) -> Any:
    """Run a call that takes part in collectives; a lost or silent peer ends the job with one line."""
    limit = timeout or float(os.environ.get("QWEN_MLX_RANK_TIMEOUT", 300))
    timer = threading.Timer(limit, _die, [f"a rank stopped answering (no reply within {limit:g} s); "
                                          "the distributed job ends"])
    timer.daemon = True
    timer.start()
    try:
        return run()
    except RuntimeError as e:
        if _LOST.search(str(e)):
            _die("a rank of the distributed job was lost (its connection closed); the job ends")
        raise
    finally:
        timer.cancel()


def _on_fatal_signal(size: int) -> None:
    """mlx.launch stops every rank with SIGTERM once one dies: say so on rank 0 rather than vanish."""
    def handler(signum: int, frame: Any) -> None:
        _die(f"stopped by the launcher (SIGTERM): one of the {size} ranks ended or the job was stopped")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


_stderr_fd = 2


def _quiet_ring_messages() -> None:
    """MLX's ring backend writes a line per failed socket operation to stderr ("[ring] Socket 5 was closed
    by the peer" ...) when a peer goes; only the one error line should reach the user. stderr passes through
    a pipe whose reader drops those lines; `_die` writes to the real stderr directly."""
    global _stderr_fd
    if _stderr_fd != 2:
        return
    sys.stderr.flush()
    _stderr_fd = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def restore() -> None:  # at exit: the real stderr back, and what the pipe still holds written out
        sys.stderr.flush()
        os.dup2(_stderr_fd, 2)
        thread.join(timeout=2)
    atexit.register(restore)  # registered first, so it runs after the other ranks are told to stop

    def pump() -> None:
        with os.fdopen(read, "rb", buffering=0) as source:
            pending = b""
            while chunk := source.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                kept = b"".join(line + b"\n" for line in lines if not _LOST.match(line.decode(errors="replace")))
                if kept:
                    os.write(_stderr_fd, kept)
            if pending:
                os.write(_stderr_fd, pending)
    thread = threading.Thread(target=pump, name="qwen-mlx-stderr", daemon=True)
    thread.start()
