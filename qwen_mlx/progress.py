"""Progress display for the long steps (loading, converting, exporting), on stderr so stdout stays clean.

rich draws it; it stays silent when stderr is not a terminal (scripts, CI logs) or QWEN_MLX_QUIET is set.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress_enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("QWEN_MLX_QUIET")


def progress_bar(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    if not progress_enabled():
        yield from items
        return
    from rich.console import Console
    from rich.progress import track

    yield from track(items, description=description, total=total, transient=True,
                     console=Console(stderr=True))
