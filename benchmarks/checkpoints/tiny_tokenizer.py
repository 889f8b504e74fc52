"""A small but real Qwen2-style byte-level BPE tokenizer for tiny models (offline, trains in milliseconds).

`write_tiny_tokenizer(folder)` writes tokenizer.json, tokenizer_config.json and generation_config.json the way
an HF Qwen2.5 checkpoint folder has them (same normalizer, pre-tokenizer regex, decoder, added tokens, and the
real Qwen2.5 chat template: qwen2.5_chat_template.jinja beside this file), so both qwen_mlx and
`transformers.AutoTokenizer` load it. `python -m benchmarks.checkpoints.tiny_tokenizer OUT_DIR` writes one.
Ids: the trained byte-level vocabulary first, then the added tokens, all below `vocab_size`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from benchmarks.common import prog

QWEN25_CHAT_TEMPLATE = Path(__file__).with_name("qwen2.5_chat_template.jinja").read_text(encoding="utf-8")

# Qwen2's pre-tokenizer split (transformers' PRETOKENIZE_REGEX for Qwen2).
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# (content, special) in Qwen2.5's order; <tool_call> tags are added but not special there.
ADDED_TOKENS = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's what we'll do, isn't it? They're here; I've seen them.",
    "Hello, world! How are you today? I am fine, thank you. Please write a short story about a robot.",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "system\nuser\nassistant\n",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for i in range(10):\n\tprint(i, i * i)  # squares\n",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)\nprint(x.shape)\n",
    'function add(a, b) { return a + b; }\nconst s = "hello" + \'world\';\n',
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    "你好，世界！今天天气很好。我们一起去公园散步吧。机器学习和深度学习是人工智能的重要分支。",
    "中文分词测试：北京大学生前来应聘。请用中文回答问题。",
    "Emoji: 😀😃😄 🚀🔥 👍🏽 ❤️ 🇫🇷 👨‍👩‍👧‍👦 done.",
    "Numbers 0123456789 3.14159 2e10 -42 1,000,000 and math: x² + y² = z², ∑ ∫ √ ≠ ≤ ≥ π.",
    "Accents: café naïve résumé über straße Ångström. Русский текст. Ελληνικά. العربية. 日本語のテキスト。",
    "    indented    with   many     spaces\n\n\n\nand blank lines\r\n\r\nand CRLF.",
    "<tool_call>\n{\"name\": \"search\", \"arguments\": {\"query\": \"mlx\"}}\n</tool_call>",
]


def _train(vocab_size: int) -> Tokenizer:
    bpe = BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = BpeTrainer(
        vocab_size=vocab_size - len(ADDED_TOKENS),  # room for the added tokens after the BPE vocabulary
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    for content, special in ADDED_TOKENS:
        token = AddedToken(content, lstrip=False, rstrip=False, normalized=False, special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    assert tok.get_vocab_size(with_added_tokens=True) <= vocab_size
    return tok


def write_tiny_tokenizer(folder: Path, vocab_size: int = 512) -> None:
    """Train the tiny tokenizer and write an HF Qwen2.5-style tokenizer into `folder` (created if needed).

    Files: tokenizer.json, tokenizer_config.json (Qwen2.5 chat template, eos <|im_end|>, pad <|endoftext|>),
    generation_config.json (bos/pad <|endoftext|>, eos [<|im_end|>, <|endoftext|>]; no sampling defaults).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = _train(vocab_size)
    tok.save(str(folder / "tokenizer.json"))
    ids = {content: tok.token_to_id(content) for content, _ in ADDED_TOKENS}
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(ids[content]): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for content, special in ADDED_TOKENS
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": QWEN25_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (folder / "tokenizer_config.json").write_text(text, encoding="utf-8")
    generation = {
        "bos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
    }
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    """python -m benchmarks.checkpoints.tiny_tokenizer OUT_DIR [--vocab-size N]"""
    import argparse

    p = argparse.ArgumentParser(prog=prog(__spec__.name), description="Write the tiny tokenizer's files into OUT_DIR.")
    p.add_argument("out", type=Path)
    p.add_argument("--vocab-size", type=int, default=512, help="every id is below it (default 512)")
    a = p.parse_args(argv)
    write_tiny_tokenizer(a.out, vocab_size=a.vocab_size)


if __name__ == "__main__":
    main()
