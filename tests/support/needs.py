"""What a test needs from outside the venv (Chromium, the edge runtimes' environments): a missing piece is
skipped with its reason on a developer's machine and fails in CI (CI=true), where .ci/run installs
chromium and benchmarks/peers/setup_peers.sh the peers before any test runs."""

from __future__ import annotations

import os

import pytest

from benchmarks.peers import edge_runtimes as er  # standard library only at import time


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """Skip here; fail in CI, which installs everything the tests need."""
    if in_ci():
        pytest.fail(f"missing in CI: {reason} (.ci/run installs chromium, benchmarks/peers/setup_peers.sh the peers)")
    pytest.skip(reason)


def needs_peer(runtime: str) -> None:
    """An edge runtime (genai, optimum, transformersjs) that must be installed under $QWEN_MLX_PEERS."""
    reason = er.missing_reason(runtime)
    if reason is not None:
        unavailable(f"{runtime}: {reason}")
