"""The layering written in pyproject.toml ([tool.importlinter]) holds: imports run downhill, qwen_mlx never
imports export, and no sibling packages import each other in a circle. A change that breaks a contract
fails here with import-linter's report of the offending import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout
