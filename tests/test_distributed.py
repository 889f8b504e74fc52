"""One model over two ranks (`mlx.launch --backend ring -n 2` on 127.0.0.1): the same greedy float32 tokens as
one process, tensor and pipeline parallel, for each architecture family; the ordinary CLI; a rank that dies.

Every run starts two real MLX processes talking over loopback through MLX's ring backend: nothing is mocked.
The real checkpoint's run (and its memory figure) is marked `real`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = shutil.which("mlx.launch", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(LAUNCH is None, reason="mlx.launch is not installed beside this Python")


def launch(args: list[str], n: int = 2, timeout: float = 180, env: dict | None = None,
           **kwargs) -> subprocess.Popen | subprocess.CompletedProcess:
    """`mlx.launch` of `python ARGS` on n ranks over loopback, from the checkout (stdin closed: it is not
    forwarded to the ranks)."""
    cmd = [LAUNCH, "--backend", "ring", "-n", str(n), "--python", sys.executable, "--", *args]
    full_env = {**os.environ, "QWEN_MLX_QUIET": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=timeout, **{"text": True, **kwargs})


def ranks_run(model: Path, mode: str, n: int = 2, kv_bits: int | None = None) -> dict:
    args = ["-m", "tests.support.distributed_ranks", str(model), mode, *([str(kv_bits)] if kv_bits else [])]
    if n == 1:
        out = subprocess.run([sys.executable, *args], cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=180)
    else:
        out = launch(args, n)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, out.stdout  # rank 0 alone prints
    return json.loads(lines[0])


BOTH = ("tensor", "pipeline")
# Pipeline parallelism does not look inside a layer: two families cover it; tensor parallelism runs on each.
CASES = [("tiny", "gqa2-untied", BOTH), ("tiny", "qwen2moe-shared", BOTH), ("tiny", "qwen3-bias-tied", ("tensor",)),
         ("tiny", "mqa-headdim", ("tensor",)), ("hybrid", "next-moe", BOTH), ("hybrid", "q35-tied", ("tensor",))]


@pytest.mark.parametrize("kind,name,modes", CASES, ids=[name for _, name, _ in CASES])
def test_two_ranks_give_one_process_tokens(tiny_model, hybrid_model, kind, name, modes):
    """Dense Qwen2 (and one KV head over two ranks), Qwen2-MoE with a shared expert, Qwen3, Qwen3-Next (packed
    projections, MoE) and Qwen3.5: batched decode, prompt-lookup drafts and a cached prefix."""
    model = (tiny_model if kind == "tiny" else hybrid_model)(name)
    alone = ranks_run(model, "tensor", n=1)
    assert not alone["failed"] and all(alone["tokens"])  # a row may end early on EOS
    for mode in modes:
        shared = ranks_run(model, mode)
        assert f"{mode} parallel over 2 ranks" in shared["device"]
        assert shared["failed"] == []
        assert shared["tokens"] == alone["tokens"], mode
        assert shared["cached"][-1] > 0  # (earlier rows' hits depend on the engine's timing, not the math)


def test_quantized_kv_cache_over_two_ranks(tiny_model):
    """--kv-bits: each rank stores its own KV heads quantized (one sequence at a time, as alone)."""
    model = tiny_model("kv-head64")
    alone = ranks_run(model, "tensor", n=1, kv_bits=8)
    assert ranks_run(model, "tensor", kv_bits=8)["tokens"] == alone["tokens"]


def test_cli_generate_on_two_ranks_prints_once(tiny_model):
    model = tiny_model("qwen3moe-norm")
    args = ["cli.py", "generate", "--model", str(model), "--prompt", "hello world", "--raw", "--max-tokens", "16",
            "--temperature", "0"]
    alone = subprocess.run([sys.executable, *args], cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=120)
    assert alone.returncode == 0, alone.stderr
    for mode in ("tensor", "pipeline"):
        shared = launch([*args, "--parallel", mode], text=False)
        assert shared.returncode == 0, shared.stderr
        assert shared.stdout == alone.stdout  # the reply once: the other rank prints nothing
        assert shared.stderr.count(b'"generation_tokens": 16') == 1


def test_cli_serve_on_two_ranks(tiny_model):
    """`serve` under mlx.launch: rank 0 owns the port and answers as one process's `generate` does; Ctrl-C
    (SIGINT to the launcher's process group, as a terminal sends it) stops the server and both ranks end."""
    import socket
    import urllib.request

    model = tiny_model("gqa2-untied")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    alone = subprocess.run([sys.executable, "cli.py", "generate", "--backend", "mlx", "--model", str(model),
                            "--prompt", "hello world", "--raw", "--max-tokens", "12", "--temperature", "0"],
                           cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    cmd = [LAUNCH, "--backend", "ring", "-n", "2", "--python", sys.executable, "--", "cli.py", "serve",
           "--backend", "mlx", "--model", str(model), "--port", str(port)]
    job = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "QWEN_MLX_QUIET": "1"}, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        body = json.dumps({"prompt": "hello world", "max_tokens": 12, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"content-type": "application/json"})
        deadline, reply = time.monotonic() + 90, None
        while reply is None and time.monotonic() < deadline and job.poll() is None:
            try:
                with urllib.request.urlopen(request, timeout=60) as r:
                    reply = json.loads(r.read())
            except OSError:
                time.sleep(0.5)
        assert reply is not None, job.poll()
        assert reply["choices"][0]["text"] == alone.stdout.removesuffix("\n")
        # Ctrl-C in a terminal: the launcher (which relays the ranks' output, and dies of it) and both ranks get
        # it; rank 0 stops serving and tells rank 1 to end (rank 1 itself waits for rank 0's word).
        os.killpg(job.pid, signal.SIGINT)
        deadline = time.monotonic() + 90  # the engine's grace, then rank 0 tells rank 1 (slow on a loaded box)
        while time.monotonic() < deadline and (_rank_pid(0, str(model)) or _rank_pid(1, str(model))):
            time.sleep(0.2)
        assert _rank_pid(0, str(model)) is None and _rank_pid(1, str(model)) is None  # no rank left behind
    finally:
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        job.communicate()


def test_quantize_over_two_ranks(tiny_model):
    """--quantize 4 (every matrix of qwen3moe-q64 is quantized): pipeline gives one process's reply; tensor
    parallelism cannot split its experts' 64 columns into two groups of 64, and says what to use instead."""
    args = ["cli.py", "generate", "--backend", "mlx", "--model", str(tiny_model("qwen3moe-q64")), "--prompt",
            "hello world", "--raw", "--max-tokens", "12", "--temperature", "0", "--quantize", "4"]
    alone = subprocess.run([sys.executable, *args], cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=120)
    assert alone.returncode == 0, alone.stderr
    assert launch([*args, "--parallel", "pipeline"], text=False).stdout == alone.stdout
    refused = launch([*args, "--parallel", "tensor"])
    errors = {line for line in refused.stderr.splitlines() if line.startswith("error:")}
    assert len(errors) == 1 and "use --parallel pipeline" in errors.pop(), refused.stderr


def test_uneven_heads_ask_for_pipeline(tiny_model, tmp_path):
    """Tensor parallelism over 3 ranks of 4 heads is refused before loading, with the way out named."""
    out = launch(["cli.py", "generate", "--model", str(tiny_model("gqa2-untied")), "--prompt", "hi", "--raw",
                  "--max-tokens", "2", "--parallel", "tensor"], n=3)
    errors = {line for line in out.stderr.splitlines() if line.startswith("error:")}
    assert len(errors) == 1 and "use --parallel pipeline" in errors.pop()  # (each rank finds it alike)
    assert "Traceback" not in out.stderr


def _rank_pid(rank: int, marker: str) -> int | None:
    """The pid of the process of `rank` whose command line holds `marker` (Linux /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmdline and f"MLX_RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
# A killed rank: whichever comes first, the failed collective, mlx.launch's SIGTERM to the survivors, or (on a
# loaded machine, where the ring's retries outlast the 5 s set here) the watchdog.
@pytest.mark.parametrize("sig,said", [(signal.SIGKILL, ("was lost", "one of the 2 ranks ended", "stopped answering")),
                                      (signal.SIGSTOP, ("stopped answering",))],
                         ids=["killed", "frozen"])
def test_a_lost_rank_ends_the_job_with_one_error(tiny_model, sig, said):
    """Rank 1 killed (its connection closes) or frozen (it stays connected, silent) mid-reply: rank 0 says
    so in one line, no traceback, within a bounded time (the watchdog's limit is set to 5 s here)."""
    model = tiny_model("long-context")
    cmd = [LAUNCH, "--backend", "ring", "-n", "2", "--python", sys.executable, "--", "cli.py", "generate",
           "--backend", "mlx", "--model", str(model), "--prompt", "hello world", "--raw", "--max-tokens", "1000",
           "--temperature", "0"]
    env = {**os.environ, "QWEN_MLX_QUIET": "1", "QWEN_MLX_RANK_TIMEOUT": "5"}
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    pid = None
    try:
        deadline = time.monotonic() + 60
        while pid is None and time.monotonic() < deadline and job.poll() is None:
            pid = _rank_pid(1, str(model))
            time.sleep(0.2)
        assert pid is not None
        time.sleep(6)  # loaded (~2 s) and decoding (1000 tokens take ~30 s): rank 1 is in every step
        assert job.poll() is None
        os.kill(pid, sig)
        start = time.monotonic()
        while time.monotonic() - start < 60 and _rank_pid(0, str(model)) is not None:
            time.sleep(0.2)
        elapsed = time.monotonic() - start
    finally:
        if pid is not None and sig == signal.SIGSTOP:
            os.kill(pid, signal.SIGKILL)  # (a stopped process would outlive the launcher)
        _, err = job.communicate(timeout=60)
    err = err.decode()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and any(s in errors[0] for s in said), err
    assert "Traceback" not in err and "[ring]" not in err
    assert elapsed < 30


@pytest.mark.real
def test_real_checkpoint_on_two_ranks(real_model_dir):
    """The real checkpoint through the CLI: the same greedy reply as one process, and rank 0's peak memory at
    most 0.6x a single process's (each rank evaluates only its slices; figures in docs/BENCHMARKS.md)."""
    args = ["cli.py", "generate", "--backend", "mlx", "--model", str(real_model_dir), "--prompt",
            "Write a Python function that reverses a string.", "--max-tokens", "6", "--temperature", "0"]
    alone = subprocess.run([sys.executable, *args], cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=900)
    assert alone.returncode == 0, alone.stderr
    peak = json.loads(alone.stderr.splitlines()[-1])["peak_memory_gb"]
    for mode in ("pipeline", "tensor"):
        shared = launch([*args, "--parallel", mode], timeout=900, env={"OPENBLAS_NUM_THREADS": "1"})
        assert shared.returncode == 0, shared.stderr
        assert shared.stdout == alone.stdout, mode
        stats = json.loads([line for line in shared.stderr.splitlines() if line.startswith("{")][-1])
        assert stats["peak_memory_gb"] <= 0.6 * peak, (mode, stats["peak_memory_gb"], peak)
