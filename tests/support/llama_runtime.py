"""llama.cpp itself, through llama-cpp-python built from its sdist (the same release tests/support/llama_converter.py
takes the converter from): the independent runtime for the GGUFs this project writes (tests/test_gguf_write.py).

It lives in its own virtual environment, built once (minutes: it compiles llama.cpp) and found by
`llama_cpp_python()`: $QWEN_MLX_LLAMA_CPP_PYTHON (an interpreter that imports llama_cpp), else
<cache>/llama-cpp-python-<version>/bin/python, which this file builds:

    python tests/support/llama_runtime.py build                  # the venv, into the cache
    python tests/support/llama_runtime.py JOBS_JSON PROMPT_JSON N  # the child: greedy tokens per GGUF, as JSON

Standard library only at module level: the child runs this file as a script with the other interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VERSION = "0.3.36"  # as tests/support/llama_converter.py's LLAMA_CPP_PYTHON


class LlamaCppUnavailable(RuntimeError):
    """No interpreter with llama_cpp: the opt-in test skips, naming how to build one."""


def _cache_venv() -> Path:
    from qwen_mlx.paths import cache_dir

    return cache_dir() / f"llama-cpp-python-{VERSION}"


def llama_cpp_python() -> Path:
    """An interpreter that imports llama_cpp."""
    candidates = [os.environ.get("QWEN_MLX_LLAMA_CPP_PYTHON"), str(_cache_venv() / "bin" / "python")]
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import llama_cpp"], capture_output=True, check=False) \
            if Path(candidate).is_file() else None
        if probe is not None and probe.returncode == 0:
            return Path(candidate)
    raise LlamaCppUnavailable(f"no llama-cpp-python: set QWEN_MLX_LLAMA_CPP_PYTHON, or build it once with "
                              f"`python tests/support/llama_runtime.py build` (into {_cache_venv()})")


def build() -> Path:
    """llama-cpp-python==VERSION from its sdist into the cache's venv (CPU only); prints how long it took."""
    venv = _cache_venv()
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-binary", "llama-cpp-python",
                    f"llama-cpp-python=={VERSION}", "numpy"], check=True)
    print(f"built {venv} in {time.monotonic() - start:.0f} s")
    return venv / "bin" / "python"


def greedy(python: Path, ggufs: dict[str, str], prompt: list[int], n: int, timeout: float = 600) -> dict[str, Any]:
    """{name: {"tokens": n greedy token ids llama.cpp computes after `prompt`, "logits": its logits at each
    position of prompt + tokens[:-1]}, or why it did not load} for each GGUF, in one child process."""
    result = subprocess.run([str(python), __file__, json.dumps(ggufs), json.dumps(prompt), str(n)],
                            capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"llama.cpp failed:\n{tail}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _child(ggufs: str, prompt: str, n: str) -> None:
    """Greedy decoding with llama.cpp's own logits: argmax of the last position's, no sampler in between."""
    import numpy as np
    from llama_cpp import Llama

    out: dict[str, list[int] | str] = {}
    for name, path in json.loads(ggufs).items():
        try:
            # A float32 KV cache (type 0): llama.cpp's default f16 one rounds keys and values by ~1e-3, enough to
            # flip a near-tie of a tiny random model's logits.
            llm = Llama(model_path=path, n_ctx=256, n_batch=256, n_threads=2, logits_all=True, verbose=False,
                        type_k=0, type_v=0)
        except ValueError as error:  # llama.cpp refused the file; its reason is in its own log (verbose=True)
            out[name] = f"not loaded: {error}"
            continue
        tokens = list(json.loads(prompt))
        llm.eval(tokens)
        got: list[int] = []
        for _ in range(int(n)):
            got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([got[-1]])
        # The logits at every position of prompt + greedy tokens (but the last), for a comparison beyond argmax.
        out[name] = {"tokens": got, "logits": np.asarray(llm.scores[:llm.n_tokens - 1]).tolist()}
        llm.close()
    print(json.dumps(out))


if __name__ == "__main__":
    if sys.argv[1:] == ["build"]:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        build()
    else:
        _child(*sys.argv[1:])
