"""`cli.py serve` as a real server process on 127.0.0.1 (port 0: the one it picked is read from its log),
with the official `openai` client pointed at it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai

from tests.support.cli import ROOT


class Server:
    def __init__(self, folder: Path, *args: str):
        env = dict(os.environ, QWEN_MLX_QUIET="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        env.pop("QWEN_MLX_API_KEY", None)
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", "--model", str(folder),
                                      "--dtype", "float32", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        self.lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("the server exited: " + "".join(self.lines))
            self.lines.append(line)
            if " on http://" in line:
                self.url = line.split(" on ")[1].split()[0]
                break
        threading.Thread(target=self._drain, daemon=True).start()
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("the server did not come up")

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def client(self, key: str | None = None, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=120, **kw)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
