"""Progress display for the long steps (loading, converting, exporting), on stderr so stdout stays clean.

rich draws it; it stays silent when stderr is not a terminal (scripts, CI logs) or QWEN_MLX_QUIET is set.
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def progress_activity(description: str) -> Iterator[None]:
    """A bar with the time elapsed for one long step whose length is not known ahead (a one-time export): lines
    the step prints to stderr scroll above it. Silent where progress_bar is."""
    if not progress_enabled():
        yield
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        progress.add_task(description, total=None)
        yield
