"""llama.cpp's HF -> GGUF converter (`convert_hf_to_gguf.py`), which writes the GGUFs users download: taken once from
the llama-cpp-python sdist on PyPI into the cache (it cannot be vendored here: licence and size), and run in a child
process with the gguf-py it ships (newer than the venv's `gguf`, which must not shadow it, nor it ours).

The converter knows a tokenizer by a hash of its encodings and refuses others; the tiny test tokenizer is not one of
the releases', so the child names the pre-tokenizer itself (`qwen2`, or Qwen3.5's `qwen35`), as the hash table
would for the real tokenizers. Everything else is the converter's own code path.

    python tests/support/llama_converter.py LLAMA_DIR JOBS_JSON    # the child: [{"pre": ..., "args": [...]}, ...]

Standard library only at module level: the child runs this file as a script.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendor/llama.cpp converter the tests run (bump to follow llama.cpp)
_KEEP = ("convert_hf_to_gguf.py", "LICENSE", "conversion/", "gguf-py/gguf/")


class ConverterUnavailable(RuntimeError):
    """The sdist could not be fetched (no registry, no network): the tests that need it skip."""


def converter_dir(cache: Path) -> Path:
    """llama.cpp's converter (the script, its `conversion` package and gguf-py) under `cache`, fetched once."""
    from qwen_mlx.files import file_lock

    target = cache / f"llama.cpp-convert-{LLAMA_CPP_PYTHON}"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with file_lock(cache / f".{target.name}.lock"):
        if (target / "convert_hf_to_gguf.py").is_file():
            return target
        with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
            staging = Path(tmp) / "llama.cpp"
            _extract(_download(Path(tmp)), staging)
            staging.rename(target)  # whole or not at all: the script appears last of all
    return target


def _download(dest: Path) -> Path:
    """The sdist, with the interpreter's own pip (its build metadata step needs the registry too)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(dest),
               f"llama-cpp-python=={LLAMA_CPP_PYTHON}"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    found = sorted(dest.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    if result.returncode != 0 or not found:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConverterUnavailable(f"pip could not fetch llama-cpp-python=={LLAMA_CPP_PYTHON} (for llama.cpp's "
                                   f"convert_hf_to_gguf.py): {detail}")
    return found[0]


def _extract(sdist: Path, out: Path) -> None:
    """Only what the converter needs, from vendor/llama.cpp/ of the sdist."""
    root = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    with tarfile.open(sdist) as archive:
        for member in archive:
            relative = member.name.removeprefix(root)
            if member.isfile() and member.name.startswith(root) and relative.startswith(_KEEP):
                member.name = relative
                archive.extract(member, out, filter="data")
    if not (out / "convert_hf_to_gguf.py").is_file():
        raise ConverterUnavailable(f"{sdist.name} holds no vendor/llama.cpp/convert_hf_to_gguf.py")


def convert(llama_dir: Path, jobs: list[tuple[str, list[str]]], timeout: float = 300) -> None:
    """Run the converter once per (pre-tokenizer, command-line arguments) job, all in one child process (torch
    and transformers imported once). Raises with the converter's last lines when a job fails."""
    spec = json.dumps([{"pre": pre, "args": args} for pre, args in jobs])
    result = subprocess.run([sys.executable, __file__, str(llama_dir), spec], capture_output=True, text=True,
                            timeout=timeout, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{tail}")


def _child(llama_dir: str, spec: str) -> None:
    import runpy

    here = Path(__file__).resolve().parent  # tests/support, whose gguf.py must not stand in for the package
    sys.path[:] = [f"{llama_dir}/gguf-py", llama_dir] + [p for p in sys.path if Path(p or ".").resolve() != here]
    from conversion import base  # the converter's own package, found first on the path

    script = runpy.run_path(f"{llama_dir}/convert_hf_to_gguf.py", run_name="convert_hf_to_gguf")
    for job in json.loads(spec):
        base.TextModel.get_vocab_base_pre = lambda self, tokenizer, pre=job["pre"]: pre
        sys.argv = ["convert_hf_to_gguf.py", *job["args"]]
        script["main"]()


if __name__ == "__main__":
    _child(*sys.argv[1:])
