"""A tiny checkpoint with Qwen3.5's thinking template, for tests of reasoning kept apart from the answer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# The tiny tokenizer's template ends with Qwen2.5's generation tail (benchmarks/checkpoints/tiny_tokenizer.py).
QWEN25_TAIL = "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
# Qwen3.5's generation tail: the prompt opens the reasoning block unless thinking is switched off.
QWEN35_TAIL = ("{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
               "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
               "        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- else %}\n        {{- '<think>\\n' }}\n"
               "    {%- endif %}\n{%- endif %}\n")


def thinking_copy(src: Path, dst: Path, max_position_embeddings: int = 1024) -> Path:
    """A copy of the tiny checkpoint `src` at `dst` whose chat template thinks as Qwen3.5's does, with room in
    its context for a chat with tools (Qwen's tool prompt is long, and the tiny tokenizer is byte-level)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    assert config["chat_template"].endswith(QWEN25_TAIL)
    config["chat_template"] = config["chat_template"].removesuffix(QWEN25_TAIL) + QWEN35_TAIL
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    config = json.loads((dst / "config.json").read_text())
    config["max_position_embeddings"] = max_position_embeddings
    (dst / "config.json").write_text(json.dumps(config))
    return dst
