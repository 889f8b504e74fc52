"""Shared pytest fixtures for the tiny tokenizer.

tests/conftest.py re-exports them to the whole suite; a module may also import one itself with
`from tests.support.tokenizer_fixtures import tiny_tokenizer_dir  # noqa: F401`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.checkpoints.tiny_tokenizer import write_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the tiny Qwen2.5-style tokenizer (vocab_size 512); treat it as read-only."""
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tiny_tokenizer(folder, vocab_size=512)
    return folder
