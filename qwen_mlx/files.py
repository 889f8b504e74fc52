"""Writing a folder or a file all at once: every command that writes one (convert, export-onnx, cache-prompt,
attention) goes through here.

The folder is built in a hidden staging sibling and renamed into place only when complete, so a failure or
Ctrl-C never leaves a half-written result, and an existing folder is replaced only when asked (`force`).
Staging folders carry their writer's pid, so the next run removes those whose writer died (a kill -9 or a
power cut skips every cleanup handler).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import QwenError


def check_writable(path: Path) -> None:
    """Refuse, before any long work, an output whose folder cannot be made or written (a read-only or
    special file system, a file where a folder should be): one line naming the path and the reason. The
    nearest existing folder above `path` is probed by creating a file in it, which is what the write will do."""
    path = Path(path).expanduser().absolute()
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise QwenError(f"cannot write {path}: {ancestor} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        raise QwenError(f"cannot write {path}: {ancestor} is not writable ({e.strerror})") from None


@contextlib.contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, which some writers insist on); on success it
    replaces `path`, on any exception it is removed: a failed or interrupted write leaves no half a file."""
    path = Path(path).expanduser().absolute()
    check_writable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.tmp-", suffix=path.suffix)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        staging.chmod(0o666 & ~_umask())  # mkstemp makes it private; the result is an ordinary file
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def check_output_folder(out_dir: Path, force: bool) -> None:
    """Refuse a path that is a file, or a non-empty folder unless `force`, or one that cannot be written:
    nothing is ever clobbered silently."""
    check_writable(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise QwenError(f"{out_dir} exists and is not a folder")
        if any(out_dir.iterdir()) and not force:
            raise QwenError(f"{out_dir} is not empty (pass --force to replace it)")


@contextlib.contextmanager
def staged_folder(out_dir: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `out_dir`, on any exception it is removed."""
    out_dir = Path(out_dir).expanduser().absolute()
    check_output_folder(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out_dir)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-{os.getpid()}-"))
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
        yield staging
        replace_folder(staging, out_dir)
    except BaseException:  # Ctrl-C included
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_folder(staging: Path, out_dir: Path) -> None:
    """Rename the finished folder into place; an existing one is moved aside first and removed after, and
    put back if the rename fails."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        os.replace(staging, out_dir)  # rename(2) replaces an empty directory
        return
    old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-{os.getpid()}-"))
    os.replace(out_dir, old)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID-*` / `.NAME.old-PID-*` siblings of `out_dir` whose process is gone."""
    removed = []
    for kind in ("tmp", "old"):
        for path in out_dir.parent.glob(f".{out_dir.name}.{kind}-*"):
            pid = path.name[len(f".{out_dir.name}.{kind}-"):].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: Path) -> dict:
    """A JSON file the user gave us; corrupt JSON or text that is not UTF-8 is one clear error naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QwenError(f"{path}: corrupt JSON ({e})") from None


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent processes (pytest workers) build a cache entry once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    """Content hash, memoized per (path, size, mtime) so repeated calls in one process stay cheap."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as source:
            while chunk := source.read(1 << 22):
                digest.update(chunk)
        _SHA_MEMO[key] = digest.hexdigest()
    return _SHA_MEMO[key]
