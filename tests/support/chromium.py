"""Debian's Chromium driven by Playwright, for the tests that load a page (the server's chat page, the
browser example). Playwright downloads no browser here: it drives /usr/bin/chromium (or $QWEN_MLX_CHROMIUM).
Without the browser or the playwright package these tests skip with the reason, except in CI (CI=true),
where .ci/run installs both, so a missing piece fails."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tests.support.needs import unavailable

CHROMIUM = os.environ.get("QWEN_MLX_CHROMIUM", "/usr/bin/chromium")
# Headless, no GPU (so WebGPU has no adapter and pages run on wasm), nothing that phones home, and
# root-in-a-container friendly (no sandbox; /tmp rather than a small /dev/shm).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


@contextmanager
def chromium(profile: Path, **options) -> Iterator[object]:
    """A Playwright persistent browser context on a fresh profile folder; `options` go to the launch."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the playwright Python package is not installed (pip install -e '.[dev]')")
    if not Path(CHROMIUM).exists():
        unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    # An LD_PRELOADed OpenBLAS (the MLX speed-up, see qwen_mlx/_blas.py) makes Chromium abort at start
    # ("GPU process isn't usable"): neither Playwright's driver nor the browser gets it.
    preload = os.environ.pop("LD_PRELOAD", None)
    try:
        manager = sync_playwright().start()
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
    try:
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        context = manager.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS, env=env, **options)
        try:
            yield context
        finally:
            context.close()
    finally:
        manager.stop()
